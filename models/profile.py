"""Model size and cost: trainable parameters and multiply-accumulates (MACs) of a forward pass."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn


def count_params(model: nn.Cell) -> int:
    """Trainable parameters (BN moving statistics excluded), as published tables count them."""
    return int(sum(p.size for p in model.trainable_params()))


def count_macs(model: nn.Cell, image_size: int = 224, in_channels: int = 3) -> int:
    """MACs of one image through every Conv2d and Dense, measured by hooks on a PyNative forward.

    Counts what FLOP counters report for ResNets (convs and fully connected layers); BN, ReLU,
    pools and additions are left out, as in the published GFLOPs of these models.
    """
    total = [0]

    def conv_hook(cell: nn.Conv2d, inputs: tuple, output: ms.Tensor) -> None:
        kh, kw = cell.kernel_size
        total[0] += int(np.prod(output.shape[1:])) * (cell.in_channels // cell.group) * kh * kw

    def dense_hook(cell: nn.Dense, inputs: tuple, output: ms.Tensor) -> None:
        total[0] += cell.in_channels * cell.out_channels

    handles, natives = [], []
    for _, cell in model.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            handles.append(cell.register_forward_hook(conv_hook))
            if getattr(cell, "native", None) is not None:  # eval mode's fused conv + BN calls no hook
                natives.append((cell, cell.native))
                cell.native = None
        elif isinstance(cell, nn.Dense):
            handles.append(cell.register_forward_hook(dense_hook))
    previous_mode = ms.get_context("mode")
    was_training = model.training
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model.set_train(False)
        model(ms.Tensor(np.zeros((1, in_channels, image_size, image_size), np.float32)))
    finally:
        for handle in handles:
            handle.remove()
        for cell, native in natives:
            cell.native = native
        model.set_train(was_training)
        ms.set_context(mode=previous_mode)
    return total[0]
