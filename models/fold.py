"""Fold inference-mode BatchNorm into the convolution before it: y = conv(x) * s + t with
s = gamma / sqrt(var + eps), t = beta - mean * s becomes one convolution with weights W * s and
bias b * s + t. Only for evaluation: the folded model no longer trains like the original."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

# Every (convolution, BatchNorm) attribute pair, per cell class, where the BN reads the conv's
# output directly. A name may refer to a CellList (paired element-wise) or to a SequentialCell
# ending in a convolution (the deep stem). SequentialCells pair adjacent elements by themselves.
BN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "Bottle2neck": (("conv1", "bn1"), ("convs", "bns"), ("conv3", "bn3")),
    "ResNestBottleneck": (("conv1", "bn1"), ("conv3", "bn3")),
    "SplitAttn": (("conv", "bn0"), ("fc1", "bn1")),
    "ResNet": (("conv1", "bn1"),),
}


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.gamma.asnumpy() / np.sqrt(bn.moving_variance.asnumpy() + bn.eps)
    bias = conv.bias.asnumpy() if conv.has_bias else np.zeros(conv.out_channels, np.float32)
    shift = bn.beta.asnumpy() + (bias - bn.moving_mean.asnumpy()) * scale
    weight = conv.weight.asnumpy() * scale.reshape(-1, 1, 1, 1)
    conv.weight.set_data(ms.Tensor(weight.astype(np.float32)))
    name = conv.weight.name.rsplit(".", 1)[0] + ".bias" if "." in conv.weight.name else "bias"
    conv.bias = Parameter(ms.Tensor(shift.astype(np.float32)), name=name)
    conv.has_bias = True
    conv.bias_add = ops.BiasAdd()
    conv.folded = True


def _last_conv(cell: nn.Cell | None) -> nn.Conv2d | None:
    if isinstance(cell, nn.Conv2d):
        return cell
    if isinstance(cell, nn.SequentialCell) and len(cell) and isinstance(cell[len(cell) - 1], nn.Conv2d):
        return cell[len(cell) - 1]
    return None


def _bn_slots(cell: nn.Cell) -> list[tuple[nn.Cell | None, nn.Cell, str | int]]:
    """``(conv, owner, key)`` for every place ``owner[key]`` (index) or ``owner.key`` (name) in
    ``cell`` that may hold a BN reading ``conv``'s output directly."""
    slots: list[tuple[nn.Cell | None, nn.Cell, str | int]] = []
    if isinstance(cell, nn.SequentialCell):
        slots += [(cell[i], cell, i + 1) for i in range(len(cell) - 1)]
    for conv_name, bn_name in BN_PAIRS.get(type(cell).__name__, ()):
        convs, bns = getattr(cell, conv_name, None), getattr(cell, bn_name, None)
        if isinstance(convs, nn.CellList) and isinstance(bns, nn.CellList):
            slots += [(convs[i], bns, i) for i in range(len(convs))]
        else:
            slots.append((_last_conv(convs), cell, bn_name))
    return slots


def fold_batchnorm(net: nn.Cell) -> int:
    """Fold every BN that directly follows a convolution into it and replace the BN by Identity;
    return how many were folded. ``net`` must be in eval mode (``set_train(False)``) and, in graph
    mode, not yet called: a compiled graph does not see the change."""
    if net.training:
        raise ValueError("fold_batchnorm needs the model in eval mode (net.set_train(False))")
    folded = 0
    for _, cell in list(net.cells_and_names()):
        for conv, owner, key in _bn_slots(cell):
            bn = owner[key] if isinstance(key, int) else getattr(owner, key, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            _fold_pair(conv, bn)
            if isinstance(key, int):
                owner[key] = nn.Identity()
            else:
                setattr(owner, key, nn.Identity())
            folded += 1
    return folded
