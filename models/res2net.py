"""Res2Net: the Bottle2neck block and the Res2Net / Res2Net-v1b variants on the shared trunk."""
from __future__ import annotations

import math
from typing import Any

from mindspore import Tensor, nn, ops

from .batchnorm import BatchNorm2d
from .conv import conv_bn
from .layers import ResidualBlock, conv2d, pool3x3
from .pretrained import Pretrained, mindcv
from .registry import register_model
from .resnet import ResNet


class Bottle2neck(ResidualBlock):
    """Res2Net bottleneck: the 3x3 conv is split into ``scale`` groups of ``width`` channels,
    each conv seeing its own split plus the previous output (hierarchical residual).

    The first block of a stage ('stage' type) convolves each split independently and avg-pools
    the last one instead of passing it through.

    On blocked activations (models.blocked) the splits are blocked too when each is whole blocks
    (26w x 4s from its third stage under an AVX2 cap, its fourth with 16-channel blocks), else
    NCHW between conv1 and conv3.
    """

    expansion = 4
    last_bn_name = "bn3"
    uses_pool_pad = True
    blocked_layout = "edges"

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 down_sample: nn.Cell | None = None, drop_path: float = 0.0,
                 groups: int = 1, base_width: int = 26, scale: int = 4, pool_pad: str = "pad", dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__(down_sample, drop_path)
        if scale < 2:
            raise ValueError(f"Res2Net scale must be >= 2, got {scale}")
        width = int(math.floor(planes * (base_width / 64.0))) * groups
        self.width = width
        self.scale = scale
        self.num_convs = scale - 1
        self.is_stage = stride > 1 or down_sample is not None
        self.conv1 = conv2d(in_channels, width * scale, 1)
        self.bn1 = BatchNorm2d(width * scale)
        self.convs = nn.CellList([conv2d(width, width, 3, stride, groups=groups, dilation=first_dilation or dilation)
                                  for _ in range(self.num_convs)])
        self.bns = nn.CellList([BatchNorm2d(width) for _ in range(self.num_convs)])
        self.pool = pool3x3("avg", stride, pool_pad) if self.is_stage else None
        self.conv3 = conv2d(width * scale, planes * self.expansion, 1)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.interior_blocked = self.splits_blockable(list(self.convs), width)

    def construct(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        out = conv_bn(self.conv1, self.bn1, x, True, blocked=None if self.interior_blocked else False)
        # a blocked split of `width` channels is width / block blocks along axis 1
        splits = ops.split(out, self.width // out.shape[4] if out.ndim == 5 else self.width, axis=1)
        sp = splits[0]
        outs = []
        for i in range(self.num_convs):
            if i > 0:
                sp = splits[i] if self.is_stage else sp + splits[i]
            sp = conv_bn(self.convs[i], self.bns[i], sp, True)
            outs.append(sp)
        last = splits[self.num_convs]
        outs.append(self.pool(last) if self.is_stage else last)
        return self.merge(self.conv3, self.bn3, ops.concat(outs, axis=1), shortcut)


def _res2net(layers: tuple[int, ...], base_width: int, scale: int, v1b: bool = False, **kwargs: Any) -> ResNet:
    """Res2Net trunk; v1b adds the deep stem (width 32) and the avg-pool shortcut."""
    kwargs.setdefault("pool_pad", "pad")
    if v1b:
        kwargs.update(deep_stem=True, stem_width=32, avg_down=True)
    return ResNet(Bottle2neck, layers, block_args=dict(base_width=base_width, scale=scale), **kwargs)


@register_model(params=25_699_120, gmacs=4.26, timm="res2net50_26w_4s",
                weights=mindcv("res2net/res2net50-f42cf71b.ckpt", 79.35, 94.64, "res2net/res2net_50_ascend.yaml"))
def res2net50(**kwargs: Any) -> ResNet:
    """Res2Net-50 26w x 4s."""
    return _res2net((3, 4, 6, 3), 26, 4, **kwargs)


@register_model(params=45_206_688, gmacs=8.07, timm="res2net101_26w_4s",
                weights=mindcv("res2net/res2net101-8ae60132.ckpt", 79.56, 94.70, "res2net/res2net_101_ascend.yaml"))
def res2net101(**kwargs: Any) -> ResNet:
    """Res2Net-101 26w x 4s."""
    return _res2net((3, 4, 23, 3), 26, 4, **kwargs)


@register_model(params=25_059_816, gmacs=4.18, timm="res2net50_14w_8s",
                weights=Pretrained(79.5, 94.7, "PaddleClas"))
def res2net50_14w_8s(**kwargs: Any) -> ResNet:
    """Res2Net-50 14w x 8s."""
    return _res2net((3, 4, 6, 3), 14, 8, **kwargs)


@register_model(params=25_287_304, gmacs=4.16, timm="res2net50_48w_2s",
                weights=Pretrained(77.32, 93.53, "paper"))
def res2net50_48w_2s(**kwargs: Any) -> ResNet:
    """Res2Net-50 48w x 2s."""
    return _res2net((3, 4, 6, 3), 48, 2, **kwargs)


@register_model(params=37_051_448, gmacs=6.30, timm="res2net50_26w_6s",
                weights=Pretrained(78.58, 94.13, "paper"))
def res2net50_26w_6s(**kwargs: Any) -> ResNet:
    """Res2Net-50 26w x 6s."""
    return _res2net((3, 4, 6, 3), 26, 6, **kwargs)


@register_model(params=48_403_776, gmacs=8.34, timm="res2net50_26w_8s",
                weights=Pretrained(79.20, 94.37, "paper"))
def res2net50_26w_8s(**kwargs: Any) -> ResNet:
    """Res2Net-50 26w x 8s."""
    return _res2net((3, 4, 6, 3), 26, 8, **kwargs)


@register_model(params=25_718_352, gmacs=4.49, timm="res2net50d", weights=(
    mindcv("res2net/res2net50_v1b-99304e92.ckpt", 80.32, 95.09, "res2net/res2net_50_v1b_ascend.yaml")))
def res2net50_v1b(**kwargs: Any) -> ResNet:
    """Res2Net-50-v1b 26w x 4s: deep stem and avg-pool shortcut."""
    return _res2net((3, 4, 6, 3), 26, 4, v1b=True, **kwargs)


@register_model(params=45_225_920, gmacs=8.31, timm="res2net101d", weights=(
    mindcv("res2net/res2net101_v1b-7e6db001.ckpt", 81.14, 95.41, "res2net/res2net_101_v1b_ascend.yaml")))
def res2net101_v1b(**kwargs: Any) -> ResNet:
    """Res2Net-101-v1b 26w x 4s: deep stem and avg-pool shortcut."""
    return _res2net((3, 4, 23, 3), 26, 4, v1b=True, **kwargs)
