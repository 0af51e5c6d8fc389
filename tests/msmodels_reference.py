"""Reference networks computing and naming their parameters as mindspore/models' official ResNet
and research ResNeXt do (written here from the facts listed in models/layouts.py, not copied),
to save checkpoints in their layouts and compare logits."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops


def _conv(cin: int, cout: int, k: int, stride: int = 1, same: bool = False, groups: int = 1) -> nn.Conv2d:
    if same:
        return nn.Conv2d(cin, cout, k, stride, pad_mode="same", group=groups)
    return nn.Conv2d(cin, cout, k, stride, pad_mode="pad" if k > 1 else "valid", padding=k // 2, group=groups)


class _Shortcut(nn.SequentialCell):
    def __init__(self, cin: int, cout: int, stride: int, same: bool, eps: float) -> None:
        super().__init__([_conv(cin, cout, 1, stride, same), nn.BatchNorm2d(cout, eps=eps)])


class OfficialBasic(nn.Cell):
    """ResNet-18/34 block: 3x3 convs padded by 1, BNs ``bn1d`` / ``bn2d`` (eps 1e-4), shortcut BN eps 1e-5."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn1d = nn.BatchNorm2d(cout, eps=1e-4)
        self.conv2 = _conv(cout, cout, 3)
        self.bn2d = nn.BatchNorm2d(cout, eps=1e-4)
        self.relu = nn.ReLU()
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.down_sample_layer = _Shortcut(cin, cout, stride, same=False, eps=1e-5)

    def construct(self, x: Tensor) -> Tensor:
        out = self.bn2d(self.conv2(self.relu(self.bn1d(self.conv1(x)))))
        identity = self.down_sample_layer(x) if self.has_shortcut else x
        return self.relu(out + identity)


class OfficialBottleneck(nn.Cell):
    """ResNet-50+ block: 'same' convolutions, stride on the 3x3, every BN eps 1e-4."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = _conv(cin, mid, 1, same=True)
        self.bn1 = nn.BatchNorm2d(mid, eps=1e-4)
        self.conv2 = _conv(mid, mid, 3, stride, same=True)
        self.bn2 = nn.BatchNorm2d(mid, eps=1e-4)
        self.conv3 = _conv(mid, cout, 1, same=True)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-4)
        self.relu = nn.ReLU()
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.down_sample_layer = _Shortcut(cin, cout, stride, same=True, eps=1e-4)

    def construct(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.down_sample_layer(x) if self.has_shortcut else x
        return self.relu(out + identity)


class OfficialResNet(nn.Cell):
    """``conv1`` / ``bn1`` stem, max pool (explicit pad + valid for basic blocks, 'same' otherwise),
    ``layer1..4``, mean, ``end_point``."""

    def __init__(self, basic: bool, blocks: tuple[int, ...], num_classes: int = 1001) -> None:
        super().__init__()
        self.basic = basic
        self.conv1 = _conv(3, 64, 7, 2, same=not basic)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5 if basic else 1e-4)
        self.relu = nn.ReLU()
        if basic:
            self.pad = nn.Pad(paddings=((0, 0), (0, 0), (1, 1), (1, 1)))
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        block, widths = (OfficialBasic, (64, 128, 256, 512)) if basic else (OfficialBottleneck, (256, 512, 1024, 2048))
        cin = 64
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            units = []
            for i in range(count):
                units.append(block(cin, width, 2 if stage and i == 0 else 1))
                cin = width
            setattr(self, f"layer{stage + 1}", nn.SequentialCell(units))
        self.end_point = nn.Dense(cin, num_classes)

    def construct(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(self.pad(x) if self.basic else x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.end_point(ops.mean(x, axis=(2, 3)))


class GroupConv(nn.Cell):
    """One 3x3 convolution per group over the split channels, concatenated (ResNeXt on Ascend)."""

    def __init__(self, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.convs = nn.CellList([_conv(channels // groups, channels // groups, 3, stride) for _ in range(groups)])

    def construct(self, x: Tensor) -> Tensor:
        parts = ops.split(x, x.shape[1] // self.groups, axis=1)
        outputs = ()
        for i in range(self.groups):
            outputs = outputs + (self.convs[i](parts[i]),)
        return ops.cat(outputs, axis=1)


class ResNeXtUnit(nn.Cell):
    def __init__(self, cin: int, planes: int, stride: int, groups: int, width_per_group: int,
                 group_conv: bool) -> None:
        super().__init__()
        width = planes * width_per_group // 64 * groups
        self.conv1 = _conv(cin, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = GroupConv(width, stride, groups) if group_conv else _conv(width, width, 3, stride, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.has_shortcut = stride != 1 or cin != planes * 4
        if self.has_shortcut:
            self.down_sample = ResNeXtShortcut(cin, planes * 4, stride)

    def construct(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.down_sample(x) if self.has_shortcut else x))


class ResNeXtShortcut(nn.Cell):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, 1, stride)
        self.bn = nn.BatchNorm2d(cout)

    def construct(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class ResNeXtBackbone(nn.Cell):
    def __init__(self, blocks: tuple[int, ...], groups: int, width_per_group: int, group_conv: bool) -> None:
        super().__init__()
        self.conv = _conv(3, 64, 7, 2)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        cin = 64
        for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            units = []
            for i in range(count):
                units.append(ResNeXtUnit(cin, planes, 2 if stage and i == 0 else 1, groups, width_per_group,
                                         group_conv))
                cin = planes * 4
            setattr(self, f"layer{stage + 1}", nn.SequentialCell(units))

    def construct(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn(self.conv(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNeXtHead(nn.Cell):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Dense(channels, num_classes)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc(ops.mean(x, axis=(2, 3)))


class ResNeXtNet(nn.Cell):
    """``backbone`` + ``head`` as research/cv/ResNeXt composes them."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), groups: int = 32, width_per_group: int = 4,
                 group_conv: bool = True, num_classes: int = 1000) -> None:
        super().__init__()
        self.backbone = ResNeXtBackbone(blocks, groups, width_per_group, group_conv)
        self.head = ResNeXtHead(2048, num_classes)

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def randomise_statistics(net: nn.Cell, seed: int = 0) -> None:
    """Trained-looking BatchNorm state: small running variances (so that a wrong epsilon shows),
    gammas that keep activations at unit scale, non-zero means and betas."""
    rs = np.random.RandomState(seed)
    for name, cell in net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            n = cell.gamma.shape[0]
            var = rs.uniform(0.002, 0.02, n).astype(np.float32)
            cell.moving_variance.set_data(Tensor(var))
            cell.moving_mean.set_data(Tensor(rs.normal(0, 0.05, n).astype(np.float32)))
            cell.gamma.set_data(Tensor((np.sqrt(var) * rs.uniform(0.5, 1.0, n)).astype(np.float32)))
            cell.beta.set_data(Tensor(rs.normal(0, 0.05, n).astype(np.float32)))
