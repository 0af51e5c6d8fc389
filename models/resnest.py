"""ResNeSt: the split-attention bottleneck and the ResNeSt variants on the shared trunk."""
from __future__ import annotations

from typing import Any

from mindspore import Tensor, nn, ops

from resgarden.base.specs import EvalTransform

from .batchnorm import BatchNorm2d
from .blocked import channel_count
from .conv import conv_bn
from .layers import GlobalAvgPool, ResidualBlock, conv2d, make_divisible, pool3x3
from .pretrained import mindcv
from .radix import RadixReduce
from .registry import register_model
from .resnet import ResNet


class SplitAttn(nn.Cell):
    """Split-attention conv: ``radix`` grouped 3x3 branches weighted by a softmax over the radix
    axis, computed from their pooled sum (ResNeSt, Zhang et al. 2020)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 radix: int = 2, rd_ratio: float = 0.25, rd_divisor: int = 8, dilation: int = 1) -> None:
        super().__init__()
        self.radix = radix
        self.groups = groups
        mid_channels = out_channels * radix
        attn_channels = make_divisible(in_channels * radix * rd_ratio, rd_divisor, min_value=32)
        self.conv = conv2d(in_channels, mid_channels, 3, stride, groups=groups * radix, dilation=dilation)
        self.bn0 = BatchNorm2d(mid_channels)
        self.pool = GlobalAvgPool(keep_dims=True)
        self.radix_reduce = RadixReduce(radix) if radix > 1 else None
        self.fc1 = conv2d(out_channels, attn_channels, 1, groups=groups, bias=True)
        self.bn1 = BatchNorm2d(attn_channels)
        self.fc2 = conv2d(attn_channels, mid_channels, 1, groups=groups, bias=True)

    def construct(self, x: Tensor) -> Tensor:
        """In x's layout: NCHW, or blocked (models.blocked) for radix > 1 with whole-block splits."""
        x = conv_bn(self.conv, self.bn0, x, True)
        channels = channel_count(x.shape)
        pooled = self.pool(x) if self.radix == 1 else self.radix_reduce.pool(x)
        attn = self.fc2(conv_bn(self.fc1, self.bn1, pooled, True))
        if self.radix == 1:
            return x * ops.reshape(ops.sigmoid(attn), (-1, channels, 1, 1))
        # softmax over the radix within each group; the batch stays -1 (exports take any batch size)
        attn = ops.reshape(attn, (-1, self.groups, self.radix, channels // (self.groups * self.radix)))
        attn = ops.softmax(ops.transpose(attn, (0, 2, 1, 3)), axis=1)
        return self.radix_reduce.combine(x, ops.reshape(attn, (-1, channels, 1, 1)))


class ResNestBottleneck(ResidualBlock):
    """1x1 -> split-attention 3x3 -> (avg-pool for the stride, 'avd') -> 1x1 x4.

    On blocked activations (models.blocked) the split attention runs blocked too when it has
    radix > 1 and every split is whole blocks (its pooled attention vectors stay NCHW), else in NCHW
    between conv1 and conv3."""

    expansion = 4
    last_bn_name = "bn3"
    uses_pool_pad = True
    blocked_layout = "edges"

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 down_sample: nn.Cell | None = None, drop_path: float = 0.0,
                 radix: int = 2, cardinality: int = 1, base_width: int = 64, avd: bool = True,
                 avd_first: bool = False, pool_pad: str = "same", dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__(down_sample, drop_path)
        group_width = int(planes * (base_width / 64.0)) * cardinality
        avd_stride = stride if avd and stride > 1 else 0
        conv_stride = 1 if avd_stride else stride
        self.avd_first = avd_first
        self.conv1 = conv2d(in_channels, group_width, 1)
        self.bn1 = BatchNorm2d(group_width)
        self.conv2 = SplitAttn(group_width, group_width, conv_stride, groups=cardinality, radix=radix,
                               dilation=first_dilation or dilation)
        self.avd_layer = pool3x3("avg", avd_stride, pool_pad) if avd_stride else None
        self.conv3 = conv2d(group_width, planes * self.expansion, 1)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.interior_blocked = radix > 1 and self.splits_blockable([self.conv2.conv], group_width)

    def construct(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        out = conv_bn(self.conv1, self.bn1, x, True, blocked=None if self.interior_blocked else False)
        if self.avd_layer is not None and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.avd_layer is not None and not self.avd_first:
            out = self.avd_layer(out)
        return self.merge(self.conv3, self.bn3, out, shortcut)


def _resnest(layers: tuple[int, ...], stem_width: int, **kwargs: Any) -> ResNet:
    """ResNeSt-xxd trunk: deep stem, avg-pool shortcut, radix-2 split attention with avd."""
    return ResNet(ResNestBottleneck, layers, deep_stem=True, stem_width=stem_width, avg_down=True,
                  block_args=dict(radix=2, avd=True), **kwargs)


@register_model(params=27_483_240, gmacs=5.37, timm="resnest50d",
                weights=mindcv("resnest/resnest50-f2e7fc9c.ckpt", 80.81, 95.16, "resnest/resnest50_ascend.yaml"))
def resnest50(**kwargs: Any) -> ResNet:
    """ResNeSt-50 2s1x64d."""
    return _resnest((3, 4, 6, 3), 32, **kwargs)


@register_model(params=48_275_016, gmacs=10.20, timm="resnest101e",
                weights=mindcv("resnest/resnest101-7cc5c258.ckpt", 82.90, 96.12, "resnest/resnest101_ascend.yaml",
                               eval_transform=EvalTransform(image_size=256, crop_pct=0.9)))  # as mindcv evaluates it
def resnest101(**kwargs: Any) -> ResNet:
    """ResNeSt-101 2s1x64d."""
    return _resnest((3, 4, 23, 3), 64, **kwargs)
