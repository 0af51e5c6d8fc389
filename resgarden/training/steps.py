"""How an epoch's training steps reach the device: one call per batch, or MindSpore's dataset sink
mode, where batches go through the device's queue and one call runs ``sink_size`` steps.

Both yield ``(steps run, loss Tensor)`` and never read the loss back themselves: the training loop
reads it where it logs, so GPU / Ascend can queue the next steps meanwhile.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from resgarden.base.errors import ConfigError
from resgarden.data.batches import BatchSource, batches

logger = logging.getLogger("resgarden")
SINK_TARGETS = ("GPU", "Ascend")  # MindSpore's data_sink refuses every other target


def batch_steps(train_cell: nn.Cell, loader, source: BatchSource) -> Iterator[tuple[int, Tensor]]:
    """One step per batch of ``loader`` (one epoch)."""
    for images, labels in batches(loader, source):
        yield 1, train_cell(images, labels)


def sink_size_for(steps_per_epoch: int, log_interval: int, first_step: int = 0) -> int:
    """Steps per sink call: the largest divisor of ``steps_per_epoch`` that is at most
    ``log_interval``, so every epoch ends on a call boundary and the log keeps its rhythm. A run
    resumed at step ``first_step`` of an epoch takes a divisor of that step too: the one queue then
    holds whole calls in the first epoch and in every later one."""
    whole = math.gcd(steps_per_epoch, first_step)  # gcd(n, 0) = n
    return max(d for d in range(1, min(whole, max(log_interval, 1)) + 1) if whole % d == 0)


def sink_jit_level(jit_level: str) -> str:
    """The compile level to hand ``data_sink``: the one given, else the target's own default, O2 on
    an Ascend 910A and O0 elsewhere. (``data_sink`` turns an empty level into O0, yet on a 910A
    runs one call of it as a whole sink loop, i.e. one step where ``sink_size`` were counted:
    mindspore/train/data_sink.py, ``_get_jit_func`` and ``sink_process``.)"""
    if jit_level != "auto":
        return jit_level
    return "O2" if ascend_910a() else "O0"


def ascend_910a() -> bool:
    """Whether this process runs on an Ascend 910A (MindSpore's "classic" training SoC)."""
    if ms.get_context("device_target") != "Ascend":
        return False
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().ascend_soc_supports_feature("amp_loss_scale_train_classic_target"))


class CallMeanLoss(nn.Cell):
    """``train_cell`` returning the mean loss of the steps of the current sink call so far: a sink
    call returns only its last step's output, so the last step returns the call's mean. Its two
    Parameters are bookkeeping, not training state (not checkpointed)."""

    def __init__(self, train_cell: nn.Cell, sink_size: int) -> None:
        super().__init__(auto_prefix=False)
        self.train_cell = train_cell
        self.sink_size = sink_size
        self.loss_sum = Parameter(Tensor(0.0, ms.float32), name="sink_call_loss_sum", requires_grad=False)
        self.steps = Parameter(Tensor(0, ms.int32), name="sink_call_steps", requires_grad=False)

    def construct(self, *batch):
        loss = ops.cast(self.train_cell(*batch), ms.float32)
        first = self.steps % self.sink_size == 0
        total = ops.select(first, loss, self.loss_sum + loss)
        ops.assign(self.loss_sum, total)
        done = self.steps + 1
        ops.assign(self.steps, done)
        return total / ops.cast((done - 1) % self.sink_size + 1, ms.float32)


class SinkSteps:
    """Dataset sink mode over one dataset that holds every remaining epoch (one compiled graph and
    one device queue for the run: a dataset per epoch would recompile the graph every epoch)."""

    def __init__(self, train_cell: nn.Cell, dataset, sink_size: int, jit_level: str) -> None:
        self.sink_size = sink_size
        config = ms.JitConfig(jit_level=sink_jit_level(jit_level))
        self._run = ms.data_sink(CallMeanLoss(train_cell, sink_size), dataset, sink_size=sink_size,
                                 jit_config=config)

    def epoch(self, steps: int) -> Iterator[tuple[int, Tensor]]:
        """``steps`` steps (a whole number of calls), ``sink_size`` per call; the loss is the call's mean."""
        if steps % self.sink_size:
            raise ValueError(f"{steps} steps are not whole sink calls of {self.sink_size}")
        for _ in range(steps // self.sink_size):
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
