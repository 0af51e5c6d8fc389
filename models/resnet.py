"""The one ResNet trunk shared by every family, plus BasicBlock / Bottleneck and the ResNet and
ResNeXt variants.

Parameter names follow mindcv's ResNet (``conv1``, ``bn1``, ``layerN.i.down_sample``,
``classifier``) so that mindcv's released ResNet/ResNeXt/Res2Net checkpoints load unchanged;
the other layouts are mapped in :mod:`models.weights`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import mindspore as ms
from mindspore import Tensor, nn, ops

from .batchnorm import BatchNorm2d
from .blocked import blocked_width, layout_ops
from .conv import conv_bn, native_conv_available
from .features import FeatureInfo, FeatureMap, check_frozen_stages, check_out_indices, freeze
from .layers import (
    ConvBnSequence,
    GlobalAvgPool,
    ResidualBlock,
    conv2d,
    conv_padding,
    init_weights,
    pool3x3,
    takes_blocked,
)
from .pooling import AvgPool
from .pretrained import mindcv
from .registry import register_model

STAGE_PLANES = (64, 128, 256, 512)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1
    last_bn_name = "bn2"
    blocked_layout = "all"

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 down_sample: nn.Cell | None = None, drop_path: float = 0.0, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__(down_sample, drop_path)
        self.conv1 = conv2d(in_channels, planes, 3, stride, dilation=first_dilation or dilation)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv2d(planes, planes, 3, dilation=dilation)
        self.bn2 = BatchNorm2d(planes)

    def construct(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        out = conv_bn(self.conv1, self.bn1, x, True)
        return self.merge(self.conv2, self.bn2, out, shortcut)


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (stride, groups) -> 1x1 x4; ``groups`` and ``base_width`` give ResNeXt."""

    expansion = 4
    last_bn_name = "bn3"
    blocked_layout = "all"

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 down_sample: nn.Cell | None = None, drop_path: float = 0.0,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, first_dilation: int | None = None) -> None:
        super().__init__(down_sample, drop_path)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv2d(in_channels, width, 1)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv2d(width, width, 3, stride, groups=groups, dilation=first_dilation or dilation)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = conv2d(width, planes * self.expansion, 1)
        self.bn3 = BatchNorm2d(planes * self.expansion)

    def construct(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        out = conv_bn(self.conv1, self.bn1, x, True)
        out = conv_bn(self.conv2, self.bn2, out, True)
        return self.merge(self.conv3, self.bn3, out, shortcut)


def make_shortcut(in_channels: int, out_channels: int, stride: int, avg_down: bool,
                  dilation: int = 1) -> ConvBnSequence:
    """Projection shortcut: strided 1x1 conv + BN, or (ResNet-D) avg-pool, 1x1 conv, BN; in a dilated
    stage (``dilation`` > 1, stride 1) timm's 2x2 stride-1 pool with zeros past the bottom/right edge."""
    if not avg_down:
        return ConvBnSequence([conv2d(in_channels, out_channels, 1, stride), BatchNorm2d(out_channels)])
    if dilation > 1 and stride == 1:
        pool = AvgPool2x2Same()
    else:
        pool = nn.AvgPool2d(kernel_size=stride, stride=stride, pad_mode="same") if stride > 1 else nn.Identity()
    if stride > 1 and native_conv_available():
        pool = AvgPool(stride, stride, "same", pool)
    return ConvBnSequence([pool, conv2d(in_channels, out_channels, 1), BatchNorm2d(out_channels)])


def make_stem(in_channels: int, deep_stem: bool, stem_width: int) -> tuple[nn.Cell, int]:
    """The 7x7/2 conv, or the deep 3x3/2-3x3-3x3 stem (ResNet-C); returns it and its width."""
    if not deep_stem:
        return conv2d(in_channels, 64, 7, 2), 64
    stem = ConvBnSequence([
        conv2d(in_channels, stem_width, 3, 2), BatchNorm2d(stem_width), nn.ReLU(),
        conv2d(stem_width, stem_width, 3), BatchNorm2d(stem_width), nn.ReLU(),
        conv2d(stem_width, stem_width * 2, 3),
    ])
    return stem, stem_width * 2


class AvgPool2x2Same(nn.Cell):
    """timm's ``AvgPool2dSame(2, 1)`` of dilated avg-pool shortcuts: one row and column of zeros past
    the bottom / right edge (by concatenation, see :func:`models.layers.pool3x3`), counted, then a
    2x2 average at stride 1: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=2, stride=1)

    def construct(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        x = ops.concat((x, ops.zeros((n, c, 1, w), x.dtype)), axis=2)
        x = ops.concat((x, ops.zeros((n, c, h + 1, 1), x.dtype)), axis=3)
        return self.pool(x)


OUTPUT_STRIDES = (8, 16, 32)


class ResNet(nn.Cell):
    """ResNet trunk: stem, four stages of ``block``, global pool, dropout, classifier.

    Args:
        block: residual block class (``BasicBlock``, ``Bottleneck``, ``Bottle2neck``,
            ``ResNestBottleneck``); it must have ``expansion`` and take
            ``(in_channels, planes, stride, down_sample, drop_path, **block_args)``.
        layers: blocks per stage.
        num_classes: classifier outputs; 0 removes the classifier (the net returns pooled features).
        in_channels: input image channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this value at the last block.
        deep_stem: three 3x3 convs (widths ``stem_width``, ``stem_width``, ``2*stem_width``)
            instead of the 7x7 conv.
        stem_width: width of the deep stem.
        avg_down: avg-pool + 1x1 conv shortcut instead of a strided 1x1 conv.
        pool_pad: ``"same"`` (MindSpore/mindcv) or ``"pad"`` (PyTorch/timm) padding for the 3x3 pools.
        conv_pad: ``"pad"`` (symmetric, the default) or ``"same"`` (MindSpore 'same', as
            mindspore/models' ResNet-50+ use) padding for the convolutions.
        block_args: extra block arguments (groups, base_width, scale, radix, avd, ...).
        features_only: ``construct`` returns a tuple of feature maps instead of logits: those of
            ``out_indices``; stages past the last one asked for and the head are not built (their
            weights in a checkpoint are skipped).
        out_indices: which maps, as timm numbers them: 0 the stem (stride 2), 1-4 the stages
            (strides 4, 8, 16, 32).
        frozen_stages: -1 nothing fixed; 0 the stem; k the stem and stages 1..k: their parameters
            are not trained and their BatchNorms keep normalising with the running statistics.
        output_stride: 32, or 16 / 8 for dense features (segmentation): the last stage (16) or the
            last two (8) keep their input's resolution and dilate their 3x3 convolutions instead,
            as timm's ``output_stride``; the same parameters, so ImageNet weights load.
        zero_init_last: start every block's last BN at gamma=0.

    ``feature_info`` (:class:`models.features.FeatureInfo`) describes the maps ``construct``
    returns with ``features_only``, else all five.
    """

    def __init__(self, block: type, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, deep_stem: bool = False,
                 stem_width: int = 64, avg_down: bool = False, pool_pad: str = "same",
                 block_args: dict[str, Any] | None = None, features_only: bool = False,
                 zero_init_last: bool = False, conv_pad: str = "pad", out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 frozen_stages: int = -1, output_stride: int = 32) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        out_indices = check_out_indices(out_indices)
        frozen_stages = check_frozen_stages(frozen_stages)
        with conv_padding(conv_pad):
            self._build(block, layers, num_classes, in_channels, drop_path_rate, deep_stem, stem_width, avg_down,
                        pool_pad, block_args, output_stride)
        self.dropout = nn.Dropout(p=drop_rate) if drop_rate > 0 else None
        init_weights(self, zero_init_last)
        self.features_only = features_only
        self.out_indices = out_indices
        if features_only:
            self._keep_maps(out_indices)
        self.frozen_stages = frozen_stages
        if frozen_stages >= 0:
            freeze([self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)
                                             if getattr(self, f"layer{i}") is not None])
        self.blocked = frozen_stages < 0 and self._blockable()
        if self.blocked:
            self.to_plain = layout_ops()[1]

    def _blockable(self) -> bool:
        """Whether the stem and stages can train on blocked activations (models.blocked): native
        kernels, the stem's outputs whole blocks, and every block able to (see ResidualBlock.blockable)."""
        if not native_conv_available() or not blocked_width():
            return False
        stem = [cell for _, cell in self.conv1.cells_and_names() if isinstance(cell, nn.Conv2d)]
        if not all(takes_blocked(conv, conv.out_channels, blocked_width()) for conv in stem):
            return False
        stages = [getattr(self, f"layer{i}") for i in range(1, 5) if getattr(self, f"layer{i}") is not None]
        return all(getattr(block, "blockable", lambda width: False)(blocked_width())
                   for stage in stages for block in stage)

    def use_blocked(self, x: Tensor) -> bool:
        """Whether this call runs the stem and stages on blocked activations: in float32 training."""
        return self.blocked and self.training and x.dtype == ms.float32

    def _keep_maps(self, out_indices: tuple[int, ...]) -> None:
        """Drop what the maps of ``out_indices`` do not need: the head and the later stages."""
        self.unused_weights = ("classifier.",) + tuple(f"layer{i}." for i in range(out_indices[-1] + 1, 5))
        for i in range(out_indices[-1] + 1, 5):
            setattr(self, f"layer{i}", None)
        self.classifier = None
        self.feature_info = FeatureInfo([self.feature_info[i] for i in out_indices])

    def _build(self, block: type, layers: Sequence[int], num_classes: int, in_channels: int, drop_path_rate: float,
               deep_stem: bool, stem_width: int, avg_down: bool, pool_pad: str,
               block_args: dict[str, Any] | None, output_stride: int = 32) -> None:
        """Stem, stages and head (see the class docstring for the arguments)."""
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stages, got layers={list(layers)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        block_args = dict(block_args or {})
        if getattr(block, "uses_pool_pad", False):
            block_args.setdefault("pool_pad", pool_pad)
        self.conv1, width = make_stem(in_channels, deep_stem, stem_width)
        self.deep_stem = deep_stem
        self.bn1 = BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.max_pool = pool3x3("max", 2, pool_pad)
        maps = [FeatureMap(num_chs=width, reduction=2, module="relu")]
        total_blocks, block_index = sum(layers), 0
        net_stride, dilation = 4, 1
        for stage, (planes, num_blocks) in enumerate(zip(STAGE_PLANES, layers)):
            stride, previous_dilation = 1 if stage == 0 else 2, dilation
            if net_stride >= output_stride:  # dense: keep the resolution, dilate instead
                dilation, stride = dilation * stride, 1
            net_stride *= stride
            out_width = planes * block.expansion
            blocks = []
            for i in range(num_blocks):
                down_sample = None
                if i == 0 and (stride != 1 or width != out_width):
                    down_sample = make_shortcut(width, out_width, stride, avg_down, dilation)
                drop_path = drop_path_rate * block_index / max(total_blocks - 1, 1)
                dilations = dict(dilation=dilation, first_dilation=previous_dilation if i == 0 else dilation) \
                    if dilation > 1 else {}
                blocks.append(block(width, planes, stride if i == 0 else 1, down_sample=down_sample,
                                    drop_path=drop_path, **dilations, **block_args))
                width, block_index = out_width, block_index + 1
            setattr(self, f"layer{stage + 1}", nn.SequentialCell(blocks))
            maps.append(FeatureMap(num_chs=width, reduction=net_stride, module=f"layer{stage + 1}"))
        self.feature_info = FeatureInfo(maps)
        self.num_features = width
        self.unused_weights: tuple[str, ...] = ()
        self.pool = GlobalAvgPool()
        self.classifier = nn.Dense(width, num_classes) if num_classes > 0 else None

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs (0: none)."""
        self.classifier = nn.Dense(self.num_features, num_classes) if num_classes > 0 else None
        if self.classifier is not None:
            init_weights(self.classifier)
        # MindSpore keys compiled graphs by the cell's creation time: renew it so that a model
        # already run in graph mode recompiles with the new head instead of reusing the old graph.
        object.__setattr__(self, "_create_time", time.time_ns())

    def forward_stem(self, x: Tensor, blocked: bool = False) -> Tensor:
        """The stem and its max pool (stride 4); blocked (models.blocked) if ``blocked``, else NCHW."""
        return self.max_pool(self.stem(x, blocked))

    def stem(self, x: Tensor, blocked: bool = False) -> Tensor:
        """The stem's activation (stride 2): conv1 (a conv or the deep stem), bn1, ReLU; blocked
        (models.blocked) if ``blocked``, else NCHW."""
        if self.deep_stem:
            return self.conv1.then_bn(x, self.bn1, True, blocked)
        return conv_bn(self.conv1, self.bn1, x, True, None, blocked)

    def forward_maps(self, x: Tensor) -> tuple[Tensor, ...]:
        """The feature maps of ``out_indices``: 0 the stem's activation (stride 2), 1-4 the stages'."""
        blocked = self.use_blocked(x)
        x = self.stem(x, blocked)
        maps = (self.to_plain(x) if blocked else x,)
        x = self.max_pool(x)
        x = self.layer1(x)
        maps = maps + (self.to_plain(x) if blocked else x,)
        if self.layer2 is not None:
            x = self.layer2(x)
            maps = maps + (self.to_plain(x) if blocked else x,)
        if self.layer3 is not None:
            x = self.layer3(x)
            maps = maps + (self.to_plain(x) if blocked else x,)
        if self.layer4 is not None:
            x = self.layer4(x)
            maps = maps + (self.to_plain(x) if blocked else x,)
        out = ()
        for i in self.out_indices:
            out = out + (maps[i],)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map (N, num_features, H/32, W/32)."""
        blocked = self.use_blocked(x)
        x = self.forward_stem(x, blocked)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.to_plain(x) if blocked else x

    def forward_head(self, x: Tensor) -> Tensor:
        """Global pool, dropout, classifier; pooled features when there is no classifier."""
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.classifier is not None:
            x = self.classifier(x)
        return x

    def construct(self, x: Tensor):
        if self.features_only:
            return self.forward_maps(x)
        return self.forward_head(self.forward_features(x))


@register_model(params=11_689_512, gmacs=1.81, timm="resnet18",
                weights=mindcv("resnet/resnet18-1e65cd21.ckpt", 70.21, 89.62, "resnet/resnet_18_ascend.yaml"))
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model(params=21_797_672, gmacs=3.66, timm="resnet34",
                weights=mindcv("resnet/resnet34-f297d27e.ckpt", 74.15, 91.98, "resnet/resnet_34_ascend.yaml"))
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model(params=25_557_032, gmacs=4.09, timm="resnet50",
                weights=mindcv("resnet/resnet50-e0733ab8.ckpt", 76.69, 93.50, "resnet/resnet_50_ascend.yaml"))
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model(params=44_549_160, gmacs=7.80, timm="resnet101",
                weights=mindcv("resnet/resnet101-689c5e77.ckpt", 78.24, 94.09, "resnet/resnet_101_ascend.yaml"))
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model(params=60_192_808, gmacs=11.51, timm="resnet152",
                weights=mindcv("resnet/resnet152-beb689d8.ckpt", 78.72, 94.45, "resnet/resnet_152_ascend.yaml"))
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152."""
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model(params=25_576_264, gmacs=4.33, timm="resnet50d")
def resnet50d(**kwargs: Any) -> ResNet:
    """ResNet-50-D: the deep stem (width 32) and the avg-pool shortcut; PyTorch-style pool padding,
    as its weights come from timm (``python -m models.convert``)."""
    kwargs.setdefault("pool_pad", "pad")
    return ResNet(Bottleneck, (3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True, **kwargs)


@register_model(params=25_028_904, gmacs=4.23, timm="resnext50_32x4d", weights=(
    mindcv("resnext/resnext50_32x4d-af8aba16.ckpt", 78.53, 94.10, "resnext/resnext50_32x4d_ascend.yaml")))
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d."""
    return ResNet(Bottleneck, (3, 4, 6, 3), block_args=dict(groups=32, base_width=4), **kwargs)


@register_model(params=44_177_704, gmacs=7.97, timm="resnext101_32x4d", weights=(
    mindcv("resnext/resnext101_32x4d-3c1e9c51.ckpt", 79.83, 94.80, "resnext/resnext101_32x4d_ascend.yaml")))
def resnext101_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x4d."""
    return ResNet(Bottleneck, (3, 4, 23, 3), block_args=dict(groups=32, base_width=4), **kwargs)


@register_model(params=83_455_272, gmacs=15.46, timm="resnext101_64x4d", weights=(
    mindcv("resnext/resnext101_64x4d-8929255b.ckpt", 80.30, 94.82, "resnext/resnext101_64x4d_ascend.yaml")))
def resnext101_64x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d."""
    return ResNet(Bottleneck, (3, 4, 23, 3), block_args=dict(groups=64, base_width=4), **kwargs)
