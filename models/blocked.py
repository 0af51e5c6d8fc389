"""The blocked activation layout of the native kernels: a float32 activation (N, C, H, W) held as the
5-D tensor (N, C / width, H, W, width), channel c being lane c % width of block c / width, which is
oneDNN's nChw16c (AVX-512) or nChw8c layout. A training trunk that keeps its activations in it
between the native convolutions, BatchNorms and sums skips the two layout conversions around
every convolution, and its 1x1 convolutions run on oneDNN's 1x1 kernels.

Only the native ops read it (:class:`models.conv.Conv2d`, :class:`models.batchnorm.BatchNorm2d`,
the elementwise sums and products of the residual blocks); the two ops of :func:`layout_ops`
convert at the edges, each the other's gradient. Cells hold them as attributes (graph mode
cannot create them)."""
from __future__ import annotations

import ctypes

from mindspore import ops

from resgarden.native import conv_library

_width: list[int] = []
_convert: list[tuple[ops.Custom, ops.Custom]] = []


def blocked_width() -> int:
    """The channel block of this CPU's layout (16 with AVX-512, 8 under an AVX2 cap), 0 without the
    native library."""
    if not _width:
        library = conv_library()[0]
        _width.append(ctypes.CDLL(str(library)).BlockedLayoutWidth() if library is not None else 0)
    return _width[0]


def channel_count(shape) -> int:
    """The channels of an activation of this shape, NCHW or blocked."""
    return shape[1] * shape[4] if len(shape) == 5 else shape[1]


def _blocked_shape(x):
    width = blocked_width()
    return [x[0], x[1] // width, x[2], x[3], width]


def _plain_shape(x):
    return [x[0], x[1] * x[4], x[2], x[3]]


def layout_ops() -> tuple[ops.Custom, ops.Custom]:
    """(to blocked, to plain): (N, C, H, W) float32, C a multiple of :func:`blocked_width`, to
    (N, C / width, H, W, width), and back; one native reorder each, the other its gradient."""
    if not _convert:
        entry = f"{conv_library()[0]}:ConvertLayout"

        def make(out_shape, bprop=None) -> ops.Custom:
            op = ops.Custom(entry, out_shape=out_shape, out_dtype=lambda x: x, func_type="aot", bprop=bprop)
            # PyNative caches shape inference by primitive and input shapes
            op.add_prim_attr("layout", "blocked" if out_shape is _blocked_shape else "plain")
            return op

        blocked_grad, plain_grad = make(_blocked_shape), make(_plain_shape)

        def blocked_bprop(x, out, dout):
            return (plain_grad(dout),)

        def plain_bprop(x, out, dout):
            return (blocked_grad(dout),)

        _convert.append((make(_blocked_shape, blocked_bprop), make(_plain_shape, plain_bprop)))
    return _convert[0]
