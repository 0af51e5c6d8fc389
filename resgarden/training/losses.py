"""Losses beyond MindSpore's cross-entropy: the binary cross-entropy of the ResNet-strikes-back
recipes (Wightman et al. 2021; timm's ``BinaryCrossEntropy``), one-vs-all over the classes."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops


class BinaryCrossEntropy(nn.Cell):
    """Mean binary cross-entropy with logits over every (image, class) pair.

    Class-index labels become one-hot targets smoothed by ``smoothing`` (``smoothing / classes`` off,
    ``1 - smoothing + smoothing / classes`` on); soft targets (mixup / cutmix, ``soft_targets``) are
    taken as they come, already smoothed upstream. With ``target_threshold`` a target above it
    becomes 1, any other 0, as in timm's ``--bce-target-thresh``."""

    def __init__(self, smoothing: float = 0.0, target_threshold: float | None = None,
                 soft_targets: bool = False) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.target_threshold = target_threshold
        self.soft_targets = soft_targets

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = ops.cast(logits, ms.float32)
        if self.soft_targets:
            targets = ops.cast(labels, ms.float32)
        else:
            classes = logits.shape[-1]
            off = self.smoothing / classes
            targets = ops.one_hot(ops.cast(labels, ms.int32), classes, Tensor(1.0 - self.smoothing + off, ms.float32),
                                  Tensor(off, ms.float32))
        if self.target_threshold is not None:
            targets = ops.cast(targets > self.target_threshold, ms.float32)
        # log(1 + exp(-|x|)) + max(x, 0) - x * t: binary cross-entropy with logits, stable for any x
        loss = ops.relu(logits) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
        return loss.mean()
