"""Small building blocks shared by every family: pooling, drop path, init helpers."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import mindspore.common.initializer as init
from mindspore import Tensor, nn, ops

from .batchnorm import BatchNorm2d
from .blocked import blocked_width, layout_ops
from .conv import Conv2d, conv_bn, conv_in_layout, native_conv_available, native_conv_disabled
from .pooling import AvgPool, MaxPool3x3

POOL_PAD_MODES = ("same", "pad")
CONV_PAD_MODES = ("pad", "same")
_conv_pad = ["pad"]  # the mode conv2d builds with; set per model by ResNet(conv_pad=...)
_portable = [False]  # inside portable_build()


@contextlib.contextmanager
def portable_build() -> Iterator[None]:
    """Build models for other runtimes (export): plain MindSpore convolutions instead of the native
    kernels, and the pools' one-pixel zero padding as a Pad operator (ONNX ``Pad``) instead of
    concatenated zeros, which an exporter would freeze into constants of one batch size. The
    outputs are the same; training keeps the faster forms."""
    previous, _portable[0] = _portable[0], True
    try:
        with native_conv_disabled():
            yield
    finally:
        _portable[0] = previous


@contextlib.contextmanager
def conv_padding(mode: str) -> Iterator[None]:
    """Build the convolutions created in this block with ``mode`` padding: ``"pad"``, PyTorch-style
    symmetric (k // 2 * dilation; our default, mindcv's and timm's weights), or ``"same"``,
    MindSpore/TF 'same' (the extra row / column of a strided conv at the bottom / right, as
    mindspore/models' ResNet-50+ were trained with)."""
    if mode not in CONV_PAD_MODES:
        raise ValueError(f"conv_pad must be one of {CONV_PAD_MODES}, got {mode!r}")
    previous, _conv_pad[0] = _conv_pad[0], mode
    try:
        yield
    finally:
        _conv_pad[0] = previous


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           groups: int = 1, bias: bool = False, dilation: int = 1) -> Conv2d:
    """A conv with symmetric padding (k // 2 * dilation) or 'same' padding inside
    :func:`conv_padding` ("same"); no bias by default."""
    padding = (kernel_size // 2) * dilation
    if padding and stride > 1 and _conv_pad[0] == "same":  # at stride 1, 'same' is the symmetric padding
        return Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="same",
                      dilation=dilation, group=groups, has_bias=bias)
    return Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                  pad_mode="pad" if padding else "valid", padding=padding,
                  dilation=dilation, group=groups, has_bias=bias)


def pool3x3(kind: str, stride: int, pad_mode: str) -> nn.Cell:
    """A 3x3 max or average pool.

    ``pad_mode="same"`` is MindSpore/TF 'same' padding (extra row/column at the bottom/right,
    averages exclude padding) as mindcv's released weights were trained with; ``"pad"`` pads one
    pixel of zeros on every side as PyTorch/timm do (averages include padding; zeros are exact
    for max pooling because every pool in these nets follows a ReLU).

    The ``"pad"`` pools pad by concatenation and pool unpadded: MindSpore's ``AvgPool2d`` refuses
    its own padding on Ascend 910B / 910_93, max pooling's own padding is slower on CPU, and
    ``nn.Pad`` is 4x slower still (and its graph-mode backward is wrong on CPU).
    """
    if pad_mode not in POOL_PAD_MODES:
        raise ValueError(f"pool pad_mode must be one of {POOL_PAD_MODES}, got {pad_mode!r}")
    pool_cls = nn.MaxPool2d if kind == "max" else nn.AvgPool2d
    if pad_mode == "same":
        pool = pool_cls(kernel_size=3, stride=stride, pad_mode="same")
    else:
        pad = nn.Pad(((0, 0), (0, 0), (1, 1), (1, 1))) if _portable[0] else ZeroPad1()
        pool = nn.SequentialCell([pad, pool_cls(kernel_size=3, stride=stride)])
    if native_conv_available():
        return MaxPool3x3(stride, pad_mode, fallback=pool) if kind == "max" else AvgPool(3, stride, pad_mode, pool)
    return pool


class ZeroPad1(nn.Cell):
    """One pixel of zeros around H and W, by concatenation: (N, C, H, W) -> (N, C, H+2, W+2)."""

    def construct(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        rows = ops.zeros((n, c, 1, w), x.dtype)
        x = ops.concat((rows, x, rows), axis=2)
        cols = ops.zeros((n, c, h + 2, 1), x.dtype)
        return ops.concat((cols, x, cols), axis=3)


class GlobalAvgPool(nn.Cell):
    """Mean over H and W: (N, C, H, W) -> (N, C) or (N, C, 1, 1) with ``keep_dims``."""

    def __init__(self, keep_dims: bool = False) -> None:
        super().__init__()
        self.keep_dims = keep_dims

    def construct(self, x: Tensor) -> Tensor:
        return ops.mean(x, axis=(2, 3), keep_dims=self.keep_dims)


class DropPath(nn.Cell):
    """Stochastic depth: zero a sample's residual branch with probability ``drop_prob``.

    The per-sample mask is ``nn.Dropout`` of ones, so its random stream is seeded by
    ``mindspore.set_seed`` like every dropout (``ops.UniformReal`` without seeds is not)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_prob}")
        self.keep_prob = 1.0 - drop_prob
        self.dropout = nn.Dropout(p=drop_prob)

    def construct(self, x: Tensor) -> Tensor:
        if not self.training or self.keep_prob == 1.0:
            return x
        return x * self.dropout(ops.ones((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below ``min_value`` or 90 % of it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def init_weights(net: nn.Cell, zero_init_last: bool = False) -> None:
    """He-normal (fan_out) convs, unit BN, uniform Dense: the init of torchvision and mindcv.

    With ``zero_init_last`` the last BN of every residual block starts at gamma=0, so each block
    begins as identity (Goyal et al.).
    """
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            cell.weight.set_data(init.initializer(init.HeNormal(mode="fan_out", nonlinearity="relu"),
                                                  cell.weight.shape, cell.weight.dtype))
            if cell.bias is not None:
                cell.bias.set_data(init.initializer("zeros", cell.bias.shape, cell.bias.dtype))
        elif isinstance(cell, nn.BatchNorm2d):
            cell.gamma.set_data(init.initializer("ones", cell.gamma.shape, cell.gamma.dtype))
            cell.beta.set_data(init.initializer("zeros", cell.beta.shape, cell.beta.dtype))
        elif isinstance(cell, nn.Dense):
            bound = 1.0 / math.sqrt(cell.in_channels)
            cell.weight.set_data(init.initializer(init.Uniform(bound), cell.weight.shape, cell.weight.dtype))
            if cell.bias is not None:
                cell.bias.set_data(init.initializer(init.Uniform(bound), cell.bias.shape, cell.bias.dtype))
    if zero_init_last:
        for _, cell in net.cells_and_names():
            bn_name = getattr(cell, "last_bn_name", None)
            if bn_name:
                last_bn = getattr(cell, bn_name)
                last_bn.gamma.set_data(init.initializer("zeros", last_bn.gamma.shape, last_bn.gamma.dtype))


def takes_blocked(conv: nn.Cell, channels: int, width: int) -> bool:
    """Whether ``conv`` can take or give blocked activations (models.blocked) of ``width``-channel
    blocks on its side of ``channels`` channels: native, without bias, the channels whole blocks."""
    return isinstance(conv, Conv2d) and conv.native is not None and not conv.has_bias and channels % width == 0


class ConvBnSequence(nn.SequentialCell):
    """A ``SequentialCell`` (same parameter names) whose conv -> BN [-> ReLU] runs are computed by
    :func:`models.conv.conv_bn`, one native primitive each in eval mode; other cells run as they are.
    A blocked input (models.blocked) gives a blocked output; the other cells see it in NCHW, but for
    the native average pools and identities."""

    def __init__(self, cells: list[nn.Cell]) -> None:
        super().__init__(cells)
        steps, i = [], 0
        # (index, 0) a cell by itself on NCHW, (index, 3) one that takes either layout; (index, 1 or 2)
        # conv_bn from it, with ReLU if 2
        while i < len(cells):
            pair = i + 1 < len(cells) and isinstance(cells[i], Conv2d) and isinstance(cells[i + 1], BatchNorm2d)
            relu = pair and i + 2 < len(cells) and isinstance(cells[i + 2], nn.ReLU)
            any_layout = isinstance(cells[i], (AvgPool, nn.Identity))
            steps.append((i, 2 if relu else 1 if pair else 3 if any_layout else 0))
            i += 3 if relu else 2 if pair else 1
        self.steps = tuple(steps)
        if native_conv_available():
            self.to_plain = layout_ops()[1]

    def construct(self, x: Tensor) -> Tensor:
        return self.run(x, self.steps)

    def run(self, x: Tensor, steps: tuple[tuple[int, int], ...], blocked: bool | None = None) -> Tensor:
        """The cells of ``steps``; conv_bn answers blocked (models.blocked) if ``blocked``, NCHW if
        not, in x's layout if None."""
        cells = self.cell_list
        out_blocked = x.ndim == 5 if blocked is None else blocked
        for index, kind in steps:
            if kind == 0:
                x = cells[index](self.to_plain(x) if x.ndim == 5 else x)
            elif kind == 3:
                x = cells[index](x)
            else:
                x = conv_bn(cells[index], cells[index + 1], x, kind == 2, None, out_blocked)
        return x

    def then_bn(self, x: Tensor, bn: nn.Cell, relu: bool, blocked: bool | None = None) -> Tensor:
        """``[relu](bn(self(x)))`` for a sequence ending in a convolution (the deep stem), that
        convolution and ``bn`` computed by :func:`models.conv.conv_bn`, in the layout of ``run``."""
        x = self.run(x, self.steps[:-1], blocked)
        return conv_bn(self.cell_list[self.steps[-1][0]], bn, x, relu, None, blocked)


class ResidualBlock(nn.Cell):
    """What every residual block shares: the shortcut (identity or projection), stochastic depth
    on the residual branch, the addition and the final ReLU. Subclasses build the branch."""

    # Which convolutions take or give blocked activations (models.blocked) when the block's input
    # is blocked: "all" (every op of the block takes them), "edges" (conv1 takes them and answers
    # in NCHW, the branch runs in NCHW, conv3 answers blocked again), or "none" (NCHW input only).
    blocked_layout = "none"

    def __init__(self, down_sample: nn.Cell | None, drop_path: float) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.down_sample = down_sample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def blockable(self, width: int) -> bool:
        """Whether this block can run on blocked activations of ``width``-channel blocks: its
        convolutions that see them native and their channels whole blocks."""
        if self.blocked_layout == "none":
            return False
        whole = self if self.blocked_layout == "all" else self.down_sample  # every channel count of these
        convs = [] if whole is None else [cell for _, cell in whole.cells_and_names() if isinstance(cell, nn.Conv2d)]
        edges = [(conv, channels) for conv in convs for channels in (conv.in_channels, conv.out_channels)]
        if self.blocked_layout == "edges":
            edges += [(self.conv1, self.conv1.in_channels), (self.conv3, self.conv3.out_channels)]
        return all(takes_blocked(conv, channels, width) for conv, channels in edges)

    @staticmethod
    def splits_blockable(convs: list[nn.Cell], channels: int) -> bool:
        """Whether a block's splits of ``channels`` channels, through ``convs``, can stay blocked
        (models.blocked) inside it: those convolutions native and every split whole blocks."""
        if not all(isinstance(conv, Conv2d) and conv.native is not None for conv in convs):
            return False
        return all(takes_blocked(conv, channels, blocked_width()) for conv in convs)

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.down_sample is None else self.down_sample(x)

    def merge(self, conv: Conv2d, bn: nn.Cell, x: Tensor, shortcut: Tensor) -> Tensor:
        """``relu(drop_path(bn(conv(x))) + shortcut)``: the branch's last conv and BN, and the merge;
        in the shortcut's layout."""
        blocked = shortcut.ndim == 5
        if self.training and self.drop_path is not None:
            return self.relu(self.drop_path(bn(conv_in_layout(conv, x, blocked))) + shortcut)
        return conv_bn(conv, bn, x, True, shortcut, blocked)
