"""``Conv2d``: MindSpore's ``nn.Conv2d`` whose CPU computation runs on resgarden's native oneDNN
kernels (``resgarden/native``) where they are available, with the same parameters and checkpoints;
and :func:`conv_bn`, conv -> BatchNorm -> [+ residual] -> [ReLU], one native primitive in eval mode."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from resgarden.native import conv_library
from resgarden.platform import native_kernels_wanted

from .blocked import blocked_width, layout_ops

_disabled = False
_ops: dict[tuple, tuple[ops.Custom, ops.Custom, ops.Custom, Tensor]] = {}
_grad_ops: dict[tuple, tuple[ops.Custom, ops.Custom, Tensor]] = {}
_fused_ops: dict[tuple, dict[tuple[bool, bool], tuple[ops.Custom, Tensor]]] = {}


@contextlib.contextmanager
def native_conv_disabled() -> Iterator[None]:
    """Build plain MindSpore convolutions inside this block (e.g. for export to MINDIR/ONNX/AIR)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


def native_conv_available() -> bool:
    """True when new ``Conv2d`` cells will use the native kernels (CPU target, library built)."""
    return (not _disabled and ms.get_context("device_target") == "CPU" and native_kernels_wanted()
            and conv_library()[0] is not None)


def _out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return -1 if size < 0 else (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def _output_shape(kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                  dilation: tuple[int, int], blocked: bool | None = None):
    """Shape inference of a convolution op of this geometry whose first inputs are x and w: its
    output blocked (5-D, see models.blocked) if ``blocked``, NCHW if not, in x's layout if None."""
    def infer(x, w, *_):
        height = _out_size(x[2], kernel[0], stride[0], pads[0] + pads[1], dilation[0])
        width = _out_size(x[3], kernel[1], stride[1], pads[2] + pads[3], dilation[1])
        if blocked or (blocked is None and len(x) == 5):
            block = x[4] if len(x) == 5 else blocked_width()
            return [x[0], w[0] // block, height, width, block]
        return [x[0], w[0], height, width]
    return infer


def first_dtype(*dtypes):
    """A custom op's output dtype: its first input's."""
    return dtypes[0]


def _native_ops(kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                dilation: tuple[int, int], groups: int) -> tuple[ops.Custom, ops.Custom, ops.Custom, Tensor]:
    """The forward ops (their bprop calls the two gradient ops) and their config tensor, one set per
    geometry. They take plain or blocked activations (models.blocked); the first answers in the
    input's layout, the second in NCHW, the third blocked."""
    key = (kernel, stride, pads, dilation, groups)
    if key not in _ops:
        library = str(conv_library()[0])
        config = Tensor(np.array([*stride, *pads, *dilation, groups], np.int64))

        grad_input = ops.Custom(f"{library}:ConvBackwardData", out_shape=lambda x, dy, w, cfg: x,
                                out_dtype=first_dtype, func_type="aot")
        grad_weight = ops.Custom(f"{library}:ConvBackwardWeights", out_shape=lambda x, dy, w, cfg: w,
                                 out_dtype=lambda x, dy, w, cfg: w, func_type="aot")

        def bprop(x, w, cfg, out, dout):
            return grad_input(x, dout, w, cfg), grad_weight(x, dout, w, cfg), ops.zeros_like(cfg)

        _grad_ops[key] = (grad_input, grad_weight, config)

        forwards = tuple(ops.Custom(f"{library}:ConvForward", out_shape=_output_shape(kernel, stride, pads, dilation,
                                                                                      blocked),
                                    out_dtype=first_dtype, func_type="aot", bprop=bprop) for blocked in (None, False, True))
        # PyNative caches shape inference by primitive and input shapes: the geometry and the output
        # layout must be part of it.
        for op in (grad_input, grad_weight):
            op.add_prim_attr("conv_geometry", repr(key))
        for op, layout in zip(forwards, ("same", "plain", "blocked")):
            op.add_prim_attr("conv_geometry", f"{key!r} {layout}")
        _ops[key] = (*forwards, config)
    return _ops[key]


def _native_fused_ops(kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                      dilation: tuple[int, int], groups: int) -> dict[tuple[bool, bool], tuple[ops.Custom, Tensor]]:
    """Per (relu, residual): the op computing ``[relu](conv(x, w * scale) + shift [+ residual])`` and
    its config tensor, one set per geometry. Their gradients run on the native gradient kernels."""
    key = (kernel, stride, pads, dilation, groups)
    if key not in _fused_ops:
        library = str(conv_library()[0])
        grad_input, grad_weight, conv_config = _grad_ops[key]
        out_shape = _output_shape(kernel, stride, pads, dilation)

        def make(relu: bool, residual: bool) -> tuple[ops.Custom, Tensor]:
            def backward(x, w, scale, out, dout):
                """(dx, dw, dscale, dshift[, dresidual])."""
                grad = ops.select(out > 0, dout, ops.zeros_like(dout)) if relu else dout
                channel_scale = ops.reshape(ops.cast(scale, w.dtype), (-1, 1, 1, 1))
                scaled = w * channel_scale
                grad_scaled = grad_weight(x, grad, scaled, conv_config)
                grads = (grad_input(x, grad, scaled, conv_config), grad_scaled * channel_scale,
                         ops.cast((grad_scaled * w).sum(axis=(1, 2, 3)), ms.float32),
                         ops.cast(grad.sum(axis=(0, 2, 3)), ms.float32))
                return grads + (grad,) if residual else grads

            if residual:
                def bprop(x, w, scale, shift, res, cfg, out, dout):
                    return backward(x, w, scale, out, dout) + (ops.zeros_like(cfg),)
            else:
                def bprop(x, w, scale, shift, cfg, out, dout):
                    return backward(x, w, scale, out, dout) + (ops.zeros_like(cfg),)
            op = ops.Custom(f"{library}:ConvBnForward", out_shape=out_shape, out_dtype=first_dtype,
                            func_type="aot", bprop=bprop)
            op.add_prim_attr("conv_geometry", f"{key!r} relu={relu} residual={residual}")
            return op, Tensor(np.array([*stride, *pads, *dilation, groups, int(relu)], np.int64))

        _fused_ops[key] = {(relu, residual): make(relu, residual) for relu in (False, True)
                           for residual in (False, True)}
    return _fused_ops[key]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (NCHW, ``pad_mode`` "pad" or "valid") that runs on the native kernels when
    :func:`native_conv_available` at construction, otherwise MindSpore's own convolution. The
    native kernels compute in float32 also under mixed precision (float16 in and out)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.native = None
        self.folded = False  # set by models.fold.fold_batchnorm: the BN after it is in the weights and bias
        if self.pad_mode in ("pad", "valid") and self.data_format == "NCHW" and native_conv_available():
            pad = self.padding if self.pad_mode == "pad" else 0
            pads = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
            geometry = (_pair(self.kernel_size), _pair(self.stride), pads, _pair(self.dilation), self.group)
            self.native, self.native_to_plain, self.native_to_blocked, self.native_config = _native_ops(*geometry)
            self.to_blocked, self.to_plain = layout_ops()
            fused = _native_fused_ops(*geometry)
            self.fused, self.fused_config = fused[(False, False)]
            self.fused_relu, self.fused_relu_config = fused[(True, False)]
            self.fused_add, self.fused_add_config = fused[(False, True)]
            self.fused_add_relu, self.fused_add_relu_config = fused[(True, True)]

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim == 5:  # blocked (models.blocked): a native training trunk
            if self.native is not None and not self.has_bias:
                return self.native(x, self.weight, self.native_config)
            return self.to_blocked(self.plain(self.to_plain(x)))
        return self.plain(x)

    def relayout(self, x: Tensor) -> Tensor:
        """The convolution with its output in the other layout than ``x``'s: NCHW for a blocked
        ``x`` (models.blocked), blocked for an NCHW one."""
        blocked = x.ndim == 4
        if self.native is not None and not self.has_bias:
            if blocked:
                return self.native_to_blocked(x, self.weight, self.native_config)
            return self.native_to_plain(x, self.weight, self.native_config)
        if blocked:
            return self.to_blocked(self.plain(x))
        return self.plain(self.to_plain(x))

    def plain(self, x: Tensor) -> Tensor:
        """The convolution of an NCHW ``x``."""
        if self.native is None:
            output = self.conv2d(x, self.weight)
        else:
            output = self.native(x, self.weight, self.native_config)
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output


def conv_in_layout(conv: Conv2d, x: Tensor, blocked: bool | None) -> Tensor:
    """``conv(x)``, its output blocked (models.blocked) if ``blocked``, NCHW if not, in x's layout if None."""
    if blocked is None or (x.ndim == 5) == blocked:
        return conv(x)
    return conv.relayout(x)


def conv_bn(conv: Conv2d, bn: nn.Cell, x: Tensor, relu: bool, residual: Tensor | None = None,
            blocked: bool | None = None) -> Tensor:
    """``relu(bn(conv(x)) + residual)`` (ReLU if ``relu``, the sum if ``residual`` is given); in
    training, the output blocked (models.blocked) if ``blocked``, NCHW if not, in x's layout if None.

    In eval mode on the native kernels this is one oneDNN primitive: the BN's scale folded into the
    weights as they are reordered, its shift as the bias, the sum and ReLU as post-ops, so that a
    plain ``create_model(name).set_train(False)`` Cell runs as fast as a folded one; the parameters
    and checkpoints are those of the separate cells. Elsewhere (training, GPU / Ascend, export) the
    separate cells run (``bn`` a :class:`models.batchnorm.BatchNorm2d`, which fuses the sum and
    ReLU in training), or ``nn.Identity`` after :func:`models.fold.fold_batchnorm`. The fused call is not a
    call of ``conv``: forward hooks on it fire in training only (or with ``conv.native = None``).
    """
    if conv.training or conv.native is None or x.dtype != ms.float32:  # float16 (AMP): MindSpore's kernels
        if not conv.folded:  # models.batchnorm.BatchNorm2d: with the sum and ReLU fused in training
            return bn(conv_in_layout(conv, x, blocked), relu, residual)
        out = bn(conv(x))
        if residual is not None:
            out = out + residual
        return ops.relu(out) if relu else out
    if conv.folded:
        scale, shift = ops.ones_like(conv.bias), conv.bias
    else:
        scale = bn.gamma * ops.rsqrt(bn.moving_variance + bn.eps)
        shift = bn.beta - bn.moving_mean * scale
        if conv.has_bias:
            shift = shift + conv.bias * scale
    scale, shift = ops.cast(scale, ms.float32), ops.cast(shift, ms.float32)
    if residual is None:
        if relu:
            return conv.fused_relu(x, conv.weight, scale, shift, conv.fused_relu_config)
        return conv.fused(x, conv.weight, scale, shift, conv.fused_config)
    if relu:
        return conv.fused_add_relu(x, conv.weight, scale, shift, residual, conv.fused_add_relu_config)
    return conv.fused_add(x, conv.weight, scale, shift, residual, conv.fused_add_config)
