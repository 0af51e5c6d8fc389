"""How an epoch's training steps reach the device: one call per batch, or MindSpore's dataset sink
mode, where batches go through the device's queue and one call runs ``sink_size`` steps.

Both yield ``(steps run, loss Tensor)`` and never read the loss back themselves: the training loop
reads it where it logs, so GPU / Ascend can queue the next steps meanwhile.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import mindspore as ms
from mindspore import Tensor, nn

from .errors import ConfigError

from .batches import BatchSource, batches

logger = logging.getLogger("resgarden")
SINK_TARGETS = ("GPU", "Ascend")  # MindSpore's data_sink refuses every other target


def batch_steps(train_cell: nn.Cell, loader, source: BatchSource) -> Iterator[tuple[int, Tensor]]:
    """One step per batch of ``loader`` (one epoch)."""
    for images, labels in batches(loader, source):
        yield 1, train_cell(images, labels)


def sink_size_for(steps_per_epoch: int, log_interval: int) -> int:
    """Steps per sink call: the largest divisor of ``steps_per_epoch`` that is at most
    ``log_interval``, so every epoch ends on a call boundary and the log keeps its rhythm."""
    return max(d for d in range(1, min(steps_per_epoch, max(log_interval, 1)) + 1) if steps_per_epoch % d == 0)


class SinkSteps:
    """Dataset sink mode over one dataset that holds every remaining epoch (one compiled graph and
    one device queue for the run: a dataset per epoch would recompile the graph every epoch)."""

    def __init__(self, train_cell: nn.Cell, dataset, sink_size: int, jit_level: str) -> None:
        self.sink_size = sink_size
        config = ms.JitConfig(jit_level="" if jit_level == "auto" else jit_level)
        self._run = ms.data_sink(train_cell, dataset, sink_size=sink_size, jit_config=config)

    def epoch(self, steps_per_epoch: int) -> Iterator[tuple[int, Tensor]]:
        """One epoch's steps, ``sink_size`` per call (the loss is the call's last step's)."""
        for _ in range(steps_per_epoch // self.sink_size):
            yield self.sink_size, self._run()


def use_sink_mode(requested: bool, device_target: str, mixup_off_epoch: int) -> bool:
    """Whether to train in dataset sink mode: asked for and possible; says why not in one line."""
    if not requested:
        return False
    if device_target not in SINK_TARGETS:
        logger.warning("--dataset_sink_mode: MindSpore supports dataset sink mode on GPU and Ascend only, not on "
                       "%s; training without it", device_target)
        return False
    if mixup_off_epoch:
        raise ConfigError("--dataset_sink_mode feeds all epochs through one pipeline, so mixup cannot stop at "
                          "--mixup_off_epoch; drop one of the two")
    return True
