"""``Conv2d``: MindSpore's ``nn.Conv2d`` whose CPU computation runs on resgarden's native oneDNN
kernels (``resgarden/native``) where they are available, with the same parameters and checkpoints."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from resgarden.native import conv_library
from resgarden.platform import native_kernels_wanted

_disabled = False
_ops: dict[tuple, tuple[ops.Custom, Tensor]] = {}


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


def _native_ops(kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                dilation: tuple[int, int], groups: int) -> tuple[ops.Custom, Tensor]:
    """The forward op (its bprop calls the two gradient ops) and its config tensor, one per geometry."""
    key = (kernel, stride, pads, dilation, groups)
    if key not in _ops:
        library = str(conv_library()[0])
        config = Tensor(np.array([*stride, *pads, *dilation, groups], np.int64))

        def forward_shape(x, w, _cfg):
            return [x[0], w[0], _out_size(x[2], kernel[0], stride[0], pads[0] + pads[1], dilation[0]),
                    _out_size(x[3], kernel[1], stride[1], pads[2] + pads[3], dilation[1])]

        def first_dtype(*dtypes):
            return dtypes[0]

        grad_input = ops.Custom(f"{library}:ConvBackwardData", out_shape=lambda x, dy, w, cfg: x,
                                out_dtype=first_dtype, func_type="aot")
        grad_weight = ops.Custom(f"{library}:ConvBackwardWeights", out_shape=lambda x, dy, w, cfg: w,
                                 out_dtype=lambda x, dy, w, cfg: w, func_type="aot")

        def bprop(x, w, cfg, out, dout):
            return grad_input(x, dout, w, cfg), grad_weight(x, dout, w, cfg), ops.zeros_like(cfg)

        forward = ops.Custom(f"{library}:ConvForward", out_shape=forward_shape, out_dtype=first_dtype,
                             func_type="aot", bprop=bprop)
        # PyNative caches shape inference by primitive and input shapes: the geometry must be part of it.
        for op in (forward, grad_input, grad_weight):
            op.add_prim_attr("conv_geometry", repr(key))
        _ops[key] = (forward, config)
    return _ops[key]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (NCHW, ``pad_mode`` "pad" or "valid") that runs on the native kernels when
    :func:`native_conv_available` at construction, otherwise MindSpore's own convolution. The
    native kernels compute in float32 also under mixed precision (float16 in and out)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.native = None
        if self.pad_mode in ("pad", "valid") and self.data_format == "NCHW" and native_conv_available():
            pad = self.padding if self.pad_mode == "pad" else 0
            pads = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
            self.native, self.native_config = _native_ops(_pair(self.kernel_size), _pair(self.stride), pads,
                                                          _pair(self.dilation), self.group)

    def construct(self, x: Tensor) -> Tensor:
        if self.native is None:
            output = self.conv2d(x, self.weight)
        else:
            output = self.native(x, self.weight, self.native_config)
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output
