"""Mixed precision levels: O0 float32; O1 convs and fully connected layers in float16; O2 all but
BatchNorm in float16; O3 everything in float16. The loss is always computed in float32."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops


def apply_amp(model: nn.Cell, level: str) -> nn.Cell:
    """Return ``model`` set up for ``level`` (O1 in place; O2/O3 by MindSpore's auto_mixed_precision)."""
    if level == "O0":
        return model
    if level == "O1":
        # MindSpore's own O1 rewrites the network's source and cannot import our package's modules,
        # so cast per cell: the white-listed heavy ops in float16, BatchNorm in float32.
        for _, cell in model.cells_and_names():
            if isinstance(cell, (nn.Conv2d, nn.Dense)):
                cell.to_float(ms.float16)
            elif isinstance(cell, nn.BatchNorm2d):
                cell.to_float(ms.float32)
        return model
    return ms.amp.auto_mixed_precision(model, level)


class Float32Loss(nn.Cell):
    """Compute ``loss`` on float32 logits whatever precision the network ran in."""

    def __init__(self, loss: nn.Cell) -> None:
        super().__init__()
        self.loss = loss

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss(ops.cast(logits, ms.float32), labels)
