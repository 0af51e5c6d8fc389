"""Per-step learning-rate schedules and optimizers with no weight decay on BN and biases."""
from __future__ import annotations

import math

import numpy as np
from mindspore import nn


def lr_per_step(cfg, steps_per_epoch: float) -> np.ndarray:
    """The LR of every optimizer step: linear warm-up to ``lr``, then the configured schedule.

    ``steps_per_epoch`` may be fractional (gradient accumulation over an uneven epoch).
    """
    total = max(1, int(math.ceil(cfg.epoch_size * steps_per_epoch)))
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    lrs = np.empty(total, np.float32)
    main_steps = max(total - warmup, 1)
    for step in range(total):
        if step < warmup:
            lrs[step] = cfg.lr * (step + 1) / warmup
            continue
        t = step - warmup
        epoch = int(step // steps_per_epoch)
        if cfg.scheduler == "cosine":
            lrs[step] = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / main_steps))
        elif cfg.scheduler == "step":
            lrs[step] = cfg.lr * cfg.decay_rate ** (epoch // cfg.decay_epochs)
        elif cfg.scheduler == "multistep":
            lrs[step] = cfg.lr * cfg.decay_rate ** sum(epoch >= m for m in cfg.milestones)
        else:
            lrs[step] = cfg.lr
    return lrs


def _no_decay(name: str) -> bool:
    return name.endswith((".gamma", ".beta", ".bias"))


def param_groups(net: nn.Cell, weight_decay: float, filter_bias_and_bn: bool) -> list[dict] | list:
    """Two groups (with and without weight decay) when filtering, else all parameters."""
    params = net.trainable_params()
    if not filter_bias_and_bn or weight_decay == 0:
        return params
    decay = [p for p in params if not _no_decay(p.name)]
    no_decay = [p for p in params if _no_decay(p.name)]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"order_params": params}]


def create_optimizer(net: nn.Cell, cfg, lrs: np.ndarray) -> nn.Optimizer:
    """momentum / nesterov / sgd / adamw / lamb over ``net`` with the per-step LRs ``lrs``."""
    groups = param_groups(net, cfg.weight_decay, cfg.filter_bias_and_bn)
    wd = 0.0 if isinstance(groups[0], dict) else cfg.weight_decay
    lr = list(lrs)
    if cfg.opt in ("momentum", "nesterov"):
        return nn.Momentum(groups, lr, cfg.momentum, weight_decay=wd, use_nesterov=cfg.opt == "nesterov")
    if cfg.opt == "sgd":
        return nn.SGD(groups, lr, weight_decay=wd)
    if cfg.opt == "lamb":
        return nn.Lamb(groups, lr, beta1=cfg.momentum, weight_decay=wd)
    return nn.AdamWeightDecay(groups, lr, beta1=cfg.momentum, weight_decay=wd)
