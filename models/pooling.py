"""``MaxPool3x3``: the 3x3 max pool of :func:`models.layers.pool3x3` ("pad" or "same" padding) as
one native pass forward and one backward (the forward keeps each output's argmax); MindSpore's
``MaxPoolGrad`` on CPU runs oneDNN's reference kernel under an AVX2 cap (~35 ms per ResNet stem at
batch 8). ``AvgPool``: an average pool that pools blocked activations (models.blocked) natively,
NCHW ones with MindSpore's pool. Used where the native convolutions run;
:func:`models.layers.pool3x3` and :func:`models.resnet.make_shortcut` build MindSpore's pools elsewhere."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

_ops: dict[tuple[int, bool], ops.Custom] = {}
_avg_ops: dict[tuple[int, int, bool], ops.Custom] = {}


def _pool_size(size: int, stride: int, same: bool, kernel: int = 3) -> int:
    """Output rows of a ``kernel`` pool at ``stride``: 'same' (ceil), or (kernel - 1) / 2 rows of
    padding on each side; -1 for an unknown size."""
    if size < 0:
        return -1
    return -(-size // stride) if same else (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def _native_op(stride: int, same: bool) -> ops.Custom:
    """(x, cfg=[stride, same]) -> (y, argmax offsets int32), x NCHW or blocked (models.blocked) and y
    in its layout; its gradient is native too."""
    key = (stride, same)
    if key not in _ops:
        from resgarden.native import conv_library

        library = str(conv_library()[0])

        def out_shape(x, cfg):
            shape = [x[0], x[1], _pool_size(x[2], stride, same), _pool_size(x[3], stride, same), *x[4:]]
            return shape, shape

        backward = ops.Custom(f"{library}:MaxPoolBackward", out_shape=lambda dy, index, x, cfg: x,
                              out_dtype=lambda dy, index, x, cfg: x, func_type="aot")

        def bprop(x, cfg, out, dout):
            return backward(dout[0], out[1], x, cfg), ops.zeros_like(cfg)

        op = ops.Custom(f"{library}:MaxPool", out_shape=out_shape, out_dtype=lambda x, cfg: (x, ms.int32),
                        func_type="aot", bprop=bprop)
        for primitive in (op, backward):  # PyNative caches shape inference by primitive and input shapes
            primitive.add_prim_attr("pool_geometry", repr(key))
        _ops[key] = op
    return _ops[key]


class MaxPool3x3(nn.Cell):
    """3x3 max pool at ``stride``: ``pad_mode="pad"`` pads a pixel of zeros on every side (timm),
    ``"same"`` is MindSpore's 'same' padding (mindcv), as :func:`models.layers.pool3x3`; float32
    only natively, NCHW or blocked (models.blocked) (``fallback`` runs other dtypes)."""

    def __init__(self, stride: int, pad_mode: str, fallback: nn.Cell) -> None:
        super().__init__()
        same = pad_mode == "same"
        self.pad_mode = pad_mode
        self.native = _native_op(stride, same)
        self.config = Tensor(np.array([stride, int(same)], np.int64))
        self.fallback = fallback  # MindSpore's pool of the same geometry, for other dtypes

    def construct(self, x: Tensor) -> Tensor:
        if x.dtype != ms.float32:
            return self.fallback(x)
        return self.native(x, self.config)[0]


def _native_avg_op(kernel: int, stride: int, same: bool) -> ops.Custom:
    """(x blocked, cfg=[kernel, stride, same]) -> y blocked; its gradient is native too."""
    key = (kernel, stride, same)
    if key not in _avg_ops:
        from resgarden.native import conv_library

        library = str(conv_library()[0])

        def out_shape(x, cfg):
            return [x[0], x[1], _pool_size(x[2], stride, same, kernel), _pool_size(x[3], stride, same, kernel), x[4]]

        backward = ops.Custom(f"{library}:AvgPoolBackward", out_shape=lambda dy, x, cfg: x,
                              out_dtype=lambda dy, x, cfg: x, func_type="aot")

        def bprop(x, cfg, out, dout):
            return backward(dout, x, cfg), ops.zeros_like(cfg)

        op = ops.Custom(f"{library}:AvgPool", out_shape=out_shape, out_dtype=lambda x, cfg: x, func_type="aot",
                        bprop=bprop)
        for primitive in (op, backward):  # PyNative caches shape inference by primitive and input shapes
            primitive.add_prim_attr("pool_geometry", f"avg {key!r}")
        _avg_ops[key] = op
    return _avg_ops[key]


class AvgPool(nn.Cell):
    """``kernel`` x ``kernel`` average pool at ``stride``: ``pad_mode="same"`` is MindSpore's 'same'
    padding, averaging over the pixels inside the map; ``"pad"`` pads (kernel - 1) / 2 pixels of zeros
    on every side and counts them (timm's avd pool). Blocked activations (models.blocked) are pooled
    natively, NCHW ones by ``fallback``, MindSpore's pool of the same geometry."""

    def __init__(self, kernel: int, stride: int, pad_mode: str, fallback: nn.Cell) -> None:
        super().__init__()
        same = pad_mode == "same"
        self.native = _native_avg_op(kernel, stride, same)
        self.config = Tensor(np.array([kernel, stride, int(same)], np.int64))
        self.fallback = fallback

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim == 5:
            return self.native(x, self.config)
        return self.fallback(x)
