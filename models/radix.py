"""ResNeSt's radix reductions, ``pool`` (the pooled sum of the splits) and ``combine`` (their
attention-weighted sum), as one pass each on resgarden's native kernels (forward and gradient)
where the native convolutions run, else as MindSpore's reshape / sum / mean / multiply."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from .blocked import channel_count
from .conv import first_dtype, native_conv_available

_native: dict[int, tuple[ops.Custom, ops.Custom]] = {}


def _native_ops(radix: int) -> tuple[ops.Custom, ops.Custom]:
    """(pool, combine) for this radix; their gradients are native ops too."""
    if radix not in _native:
        from resgarden.native import conv_library

        library = str(conv_library()[0])

        def pooled(x):
            return [x[0], channel_count(x) // radix, 1, 1]

        def combined(x, attn):
            return [x[0], x[1] // radix, *x[2:]]

        pool_backward = ops.Custom(f"{library}:RadixPoolBackward", out_shape=lambda dgap, x: x,
                                   out_dtype=lambda dgap, x: x, func_type="aot")
        combine_backward = ops.Custom(f"{library}:RadixCombineBackward", out_shape=lambda dout, x, a: (x, a),
                                      out_dtype=lambda dout, x, a: (x, a), func_type="aot")

        def pool_bprop(x, out, dout):
            return (pool_backward(dout, x),)

        def combine_bprop(x, attn, out, dout):
            return combine_backward(dout, x, attn)

        pool = ops.Custom(f"{library}:RadixPool", out_shape=pooled, out_dtype=first_dtype, func_type="aot",
                          bprop=pool_bprop)
        combine = ops.Custom(f"{library}:RadixCombine",
                             out_shape=combined, out_dtype=first_dtype,
                             func_type="aot", bprop=combine_bprop)
        # PyNative caches shape inference by primitive and input shapes: the radix must be part of it.
        for op in (pool, combine, pool_backward, combine_backward):
            op.add_prim_attr("radix", radix)
        _native[radix] = (pool, combine)
    return _native[radix]


class RadixReduce(nn.Cell):
    """For x of ``radix * C`` channels, split r of channel c at channel ``r * C + c``:
    ``pool(x)`` is the (h, w) mean of the splits' sum, [B, C, 1, 1]; ``combine(x, attn)`` with attn
    [B, radix * C, 1, 1] is the sum of the splits weighted by attn, [B, C, H, W]."""

    def __init__(self, radix: int) -> None:
        super().__init__()
        self.radix = radix
        self.native = _native_ops(radix) if native_conv_available() else None

    def splits(self, x: Tensor) -> Tensor:
        _, channels, height, width = x.shape
        # the batch stays -1, so exported graphs take any batch size
        return ops.reshape(x, (-1, self.radix, channels // self.radix, height, width))

    def pool(self, x: Tensor) -> Tensor:
        if self.native is not None and x.dtype == ms.float32:
            return self.native[0](x)
        return self.splits(x).sum(axis=1).mean(axis=(2, 3), keep_dims=True)

    def combine(self, x: Tensor, attn: Tensor) -> Tensor:
        if self.native is not None and x.dtype == ms.float32 and attn.dtype == ms.float32:
            return self.native[1](x, attn)
        return (self.splits(x) * self.splits(attn)).sum(axis=1)
