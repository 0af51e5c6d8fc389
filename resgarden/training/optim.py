"""Per-step learning-rate schedules and optimizers with no weight decay on BN and biases."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from resgarden.base.specs import OptimSpec, ScheduleSpec


def lr_per_step(schedule: ScheduleSpec, steps_per_epoch: float) -> np.ndarray:
    """The LR of every optimizer step: linear warm-up from 0 (``lr * step / warmup_steps``, so the
    first step has LR 0 and the first step after the warm-up ``lr``, as mindcv's and PaddleClas's
    warm-ups), then the configured schedule.

    ``steps_per_epoch`` may be fractional (gradient accumulation over an uneven epoch).
    """
    total = max(1, int(math.ceil(schedule.epochs * steps_per_epoch)))
    warmup = min(int(round(schedule.warmup_epochs * steps_per_epoch)), total)
    lrs = np.empty(total, np.float32)
    main_steps = max(total - warmup, 1)
    for step in range(total):
        if step < warmup:
            lrs[step] = schedule.lr * step / warmup
            continue
        t = step - warmup
        epoch = int(step // steps_per_epoch)
        if schedule.scheduler == "cosine":
            lrs[step] = schedule.min_lr + 0.5 * (schedule.lr - schedule.min_lr) * (1 + math.cos(math.pi * t / main_steps))
        elif schedule.scheduler == "step":
            lrs[step] = schedule.lr * schedule.decay_rate ** (epoch // schedule.decay_epochs)
        elif schedule.scheduler == "multistep":
            lrs[step] = schedule.lr * schedule.decay_rate ** sum(epoch >= m for m in schedule.milestones)
        else:
            lrs[step] = schedule.lr
    return lrs


def _no_decay(name: str) -> bool:
    return name.endswith((".gamma", ".beta", ".bias"))


def param_groups(net: nn.Cell, optim: OptimSpec, lrs: np.ndarray) -> list[dict]:
    """Parameter groups by (weight decay?, backbone?): no decay on BN/biases when
    ``filter_bias_and_bn``; the backbone's LR scaled by ``backbone_lr_scale``."""
    params = net.trainable_params()
    groups: dict[tuple[bool, bool], list] = {}
    for p in params:
        decay = optim.weight_decay > 0 and not (optim.filter_bias_and_bn and _no_decay(p.name))
        groups.setdefault((decay, not p.name.startswith("classifier.")), []).append(p)
    out = []
    for (decay, backbone), members in groups.items():
        scale = optim.backbone_lr_scale if backbone else 1.0
        out.append({"params": members, "weight_decay": optim.weight_decay if decay else 0.0,
                    "lr": [float(lr) * scale for lr in lrs]})
    out.append({"order_params": params})
    return out


def freeze_backbone(net: nn.Cell) -> int:
    """Make every parameter but the classifier's non-trainable; returns how many were frozen."""
    frozen = 0
    for p in net.trainable_params():
        if not p.name.startswith("classifier."):
            p.requires_grad = False
            frozen += 1
    return frozen


def create_optimizer(net: nn.Cell, optim: OptimSpec, lrs: np.ndarray) -> nn.Optimizer:
    """momentum / nesterov / sgd / adamw / lamb over ``net`` with the per-step LRs ``lrs``."""
    groups = param_groups(net, optim, lrs)
    lr = list(lrs)
    if optim.opt == "momentum":
        return nn.Momentum(groups, lr, optim.momentum)
    if optim.opt == "nesterov":
        return NesterovMomentum(groups, lr, optim.momentum)
    if optim.opt == "sgd":
        return nn.SGD(groups, lr)
    if optim.opt == "lamb":
        return Lamb(groups, lr, beta1=optim.momentum)
    return nn.AdamWeightDecay(groups, lr, beta1=optim.momentum)


_nesterov_update = ops.MultitypeFuncGraph("nesterov_update")


@_nesterov_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _nesterov_step(momentum, lr, gradient, param, moment):
    """``moment = momentum * moment + gradient; param -= lr * (gradient + momentum * moment)``."""
    next_moment = momentum * moment + gradient
    ops.assign(moment, next_moment)
    return ops.assign(param, param - lr * (gradient + momentum * next_moment))


class NesterovMomentum(nn.Momentum):
    """SGD with Nesterov momentum, as ``nn.Momentum(use_nesterov=True)`` and PyTorch's SGD
    (``nesterov=True``, no dampening) define it, written in elementary ops: MindSpore 2.10's CPU
    ``ApplyMomentum`` ignores ``use_nesterov`` and runs plain momentum. Same state (``moments``)."""

    def __init__(self, params, learning_rate, momentum: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, learning_rate, momentum, weight_decay=weight_decay, use_nesterov=True)

    def construct(self, gradients):
        gradients = self.scale_grad(self.gradients_centralization(self.decay_weight(gradients)))
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group_lr:
            return self.hyper_map(ops.partial(_nesterov_update, self.momentum), lr, gradients, self.params,
                                  self.moments)
        return self.hyper_map(ops.partial(_nesterov_update, self.momentum, lr), gradients, self.params, self.moments)


_lamb_update = ops.MultitypeFuncGraph("lamb_update")


@_lamb_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Bool", "Bool")
def _lamb_step(beta1, beta2, eps, global_step, lr, weight_decay, param, m, v, gradient, decay_flag, optim_filter):
    """One LAMB update of ``param`` (You et al. 2020) in timm's form, from elementary ops so that it runs
    on every device: the layer-wise trust ratio only where weight decay applies (``decay_flag``)."""
    if not optim_filter:
        return gradient
    step = ops.cast(global_step, ms.float32)
    next_m = beta1 * m + (1.0 - beta1) * gradient
    next_v = beta2 * v + (1.0 - beta2) * gradient * gradient
    update = (next_m / (1.0 - ops.pow(beta1, step))) / (ops.sqrt(next_v / (1.0 - ops.pow(beta2, step))) + eps)
    ops.assign(m, next_m)
    ops.assign(v, next_v)
    if decay_flag:
        update = update + weight_decay * param
        weight_norm = ops.norm(param)
        update_norm = ops.norm(update)
        update = update * ops.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                    ops.ones_like(weight_norm))
    return ops.assign(param, param - lr * update)


class Lamb(nn.Lamb):
    """LAMB as timm's ``Lamb`` (its defaults, which the ResNet-strikes-back recipes train with): the
    gradients first clipped to a global norm of ``max_grad_norm`` (0: not), bias-corrected moments,
    the trust ratio only on the parameters that weight decay reaches. The update is written in
    elementary ops instead of MindSpore's fused ``Lamb`` kernel, which MindSpore lacks on CPU (and
    which also adapts the parameters without decay); same state (``lamb_m``/``lamb_v``, global step)."""

    def __init__(self, params, learning_rate, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0) -> None:
        super().__init__(params, learning_rate, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def construct(self, gradients):
        if self.max_grad_norm > 0:
            gradients = ops.clip_by_global_norm(gradients, self.max_grad_norm)
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group_lr:
            return self.hyper_map(ops.partial(_lamb_update, self.beta1, self.beta2, self.eps, self.global_step),
                                  lr, weight_decay, self.params, self.moments1, self.moments2, gradients,
                                  self.decay_flags, self.optim_filter)
        if self.is_group:
            return self.hyper_map(ops.partial(_lamb_update, self.beta1, self.beta2, self.eps, self.global_step, lr),
                                  weight_decay, self.params, self.moments1, self.moments2, gradients,
                                  self.decay_flags, self.optim_filter)
        return self.hyper_map(ops.partial(_lamb_update, self.beta1, self.beta2, self.eps, self.global_step, lr,
                                          weight_decay),
                              self.params, self.moments1, self.moments2, gradients, self.decay_flags,
                              self.optim_filter)
