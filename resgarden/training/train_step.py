"""One training step as a Cell: loss scaling (fixed or dynamic), gradient clipping, gradient
accumulation and an exponential moving average (EMA) of the weights.

All of its state (loss scale, good-step counter, skipped-step counter, accumulated gradients,
micro-step, EMA weights and their update count) are Parameters, so checkpoints of this Cell resume
exactly.

Overflow is detected by MindSpore's ``mindspore.amp.all_finite``: on Ascend 910A (and 910B in
saturation mode) float16 overflow saturates to the largest finite value instead of inf, which only
the NPU's float status (read by ``all_finite`` there) reveals; elsewhere it checks the values. That
status is each card's own, and saturated gradients stay finite through the all-reduce, so in a
data-parallel job the ranks' verdicts are summed (as MindSpore's ``TrainOneStepWithLossScaleCell``
does): one rank's overflow skips the step on every rank.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.amp import all_finite

from models.checkpoint import SKIPPED_STEPS

_unscale = ops.MultitypeFuncGraph("unscale")
_accumulate = ops.MultitypeFuncGraph("accumulate")
_average = ops.MultitypeFuncGraph("average")
_zero = ops.MultitypeFuncGraph("zero")
_ema = ops.MultitypeFuncGraph("ema")


@_unscale.register("Tensor", "Tensor")
def _unscale_grad(scale: Tensor, grad: Tensor) -> Tensor:
    return grad / ops.cast(scale, grad.dtype)


@_accumulate.register("Tensor", "Tensor")
def _accumulate_grad(total: Tensor, grad: Tensor) -> Tensor:
    return ops.assign_add(total, grad)


@_average.register("Tensor", "Tensor")
def _average_grad(count: Tensor, total: Tensor) -> Tensor:
    return total / count


@_zero.register("Tensor")
def _zero_grad(total: Tensor) -> Tensor:
    return ops.assign(total, ops.zeros_like(total))


@_ema.register("Tensor", "Tensor", "Tensor")
def _ema_update(decay: Tensor, average: Tensor, value: Tensor) -> Tensor:
    return ops.assign(average, average * decay + value * (1.0 - decay))


EMA_WARMUP = 2000.0  # updates over which the EMA's decay rises to ema_decay (1 - 1/e of it), as mindcv's


class TrainStep(nn.Cell):
    """loss -> scaled grads -> unscale -> [accumulate] -> finite check -> [dynamic scale] -> [clip]
    -> optimizer (skipped and counted in ``skipped_steps`` on overflow) -> [EMA]. Returns the loss.

    Args:
        network: a Cell returning the loss of ``*inputs``.
        optimizer: the optimizer over ``network``'s trainable parameters.
        loss_scale: initial loss scale (1.0: none).
        dynamic_loss_scale: halve the scale on overflow, double it after ``scale_window`` good steps.
        clip_norm: clip the global gradient norm to this value (0: off).
        accumulation_steps: apply the optimizer every N calls on the mean gradient.
        ema_decay: keep an EMA of all weights and BN statistics (0: off), warmed up as mindcv's
            ``decay * (1 - exp(-t / 2000))`` after ``t`` updates.
        ema_of: the Cell whose parameters the EMA covers (default ``network``'s; with distillation the
            student alone).

    In a data-parallel context (``parallel_mode=data_parallel``) every micro-step's gradients and
    the returned loss are averaged over the ranks, so all state above stays identical on every rank.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, loss_scale: float = 1.0,
                 dynamic_loss_scale: bool = False, scale_window: int = 2000, clip_norm: float = 0.0,
                 accumulation_steps: int = 1, ema_decay: float = 0.0, ema_of: nn.Cell | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()
        self.loss_scale = Parameter(Tensor(loss_scale, ms.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.skipped_steps = Parameter(Tensor(0, ms.int32), name=SKIPPED_STEPS, requires_grad=False)
        self.dynamic_loss_scale = dynamic_loss_scale
        self.scale_window = scale_window
        self.clip_norm = clip_norm
        self.accumulation_steps = accumulation_steps
        if accumulation_steps > 1:
            self.accumulated = self.weights.clone(prefix="accum_grads", init="zeros")
            self.micro_step = Parameter(Tensor(0, ms.int32), name="accum_micro_step", requires_grad=False)
        self.data_parallel = ms.get_auto_parallel_context("parallel_mode") in (
            ms.ParallelMode.DATA_PARALLEL, ms.ParallelMode.HYBRID_PARALLEL)
        if self.data_parallel:
            self.ranks = ms.get_auto_parallel_context("device_num")
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=self.ranks)
            self.all_reduce = ops.AllReduce()  # sums: the loss, and the ranks' overflow verdicts
        self.ema_decay = ema_decay
        if ema_decay > 0:
            self.model_params = ParameterTuple(list((ema_of or network).get_parameters()))
            self.ema_params = self.model_params.clone(prefix="ema", init="same")
            self.ema_updates = Parameter(Tensor(0.0, ms.float32), name="ema_updates", requires_grad=False)

    def _all_finite(self, grads: tuple) -> Tensor:
        """Whether every rank's gradients are finite (this rank's verdict in a single process)."""
        finite = all_finite(grads)
        if not self.data_parallel:
            return finite
        overflowed = self.all_reduce(ops.reshape(ops.cast(ops.logical_not(finite), ms.float32), (1,)))
        return ops.reshape(overflowed < 0.5, ())

    def _apply(self, grads: tuple) -> Tensor:
        finite = self._all_finite(grads)
        ops.assign(self.skipped_steps, ops.select(finite, self.skipped_steps, self.skipped_steps + 1))
        if self.dynamic_loss_scale:
            good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
            grow = good >= self.scale_window
            scale = ops.select(finite, ops.select(grow, self.loss_scale * 2.0, self.loss_scale),
                               ops.maximum(self.loss_scale * 0.5, ops.ones_like(self.loss_scale)))
            ops.assign(self.loss_scale, scale)
            ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
        if self.clip_norm > 0:
            grads = ops.clip_by_global_norm(grads, self.clip_norm)
        if finite:
            self.optimizer(grads)
            if self.ema_decay > 0:
                updates = self.ema_updates + 1.0
                ops.assign(self.ema_updates, updates)
                decay = self.ema_decay * (1.0 - ops.exp(-updates / EMA_WARMUP))
                self.hyper_map(ops.partial(_ema, decay), self.ema_params, self.model_params)
        return finite

    def construct(self, *inputs):
        loss = self.network(*inputs)
        sens = ops.ones_like(loss) * ops.cast(self.loss_scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.hyper_map(ops.partial(_unscale, self.loss_scale), grads)
        if self.data_parallel:
            grads = self.grad_reducer(grads)
            loss = self.all_reduce(loss) / self.ranks
        if self.accumulation_steps > 1:
            self.hyper_map(_accumulate, self.accumulated, grads)
            step = self.micro_step + 1
            ops.assign(self.micro_step, step)
            if step % self.accumulation_steps == 0:
                mean = self.hyper_map(ops.partial(_average, Tensor(self.accumulation_steps, ms.float32)),
                                      self.accumulated)
                self._apply(mean)
                self.hyper_map(_zero, self.accumulated)
            return loss
        self._apply(grads)
        return loss
