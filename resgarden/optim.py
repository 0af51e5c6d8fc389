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


def param_groups(net: nn.Cell, cfg, lrs: np.ndarray) -> list[dict]:
    """Parameter groups by (weight decay?, backbone?): no decay on BN/biases when
    ``filter_bias_and_bn``; the backbone's LR scaled by ``backbone_lr_scale``."""
    params = net.trainable_params()
    groups: dict[tuple[bool, bool], list] = {}
    for p in params:
        decay = cfg.weight_decay > 0 and not (cfg.filter_bias_and_bn and _no_decay(p.name))
        groups.setdefault((decay, not p.name.startswith("classifier.")), []).append(p)
    out = []
    for (decay, backbone), members in groups.items():
        scale = cfg.backbone_lr_scale if backbone else 1.0
        out.append({"params": members, "weight_decay": cfg.weight_decay if decay else 0.0,
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


def create_optimizer(net: nn.Cell, cfg, lrs: np.ndarray) -> nn.Optimizer:
    """momentum / nesterov / sgd / adamw / lamb over ``net`` with the per-step LRs ``lrs``."""
    groups = param_groups(net, cfg, lrs)
    lr = list(lrs)
    if cfg.opt in ("momentum", "nesterov"):
        return nn.Momentum(groups, lr, cfg.momentum, use_nesterov=cfg.opt == "nesterov")
    if cfg.opt == "sgd":
        return nn.SGD(groups, lr)
    if cfg.opt == "lamb":
        return nn.Lamb(groups, lr, beta1=cfg.momentum)
    return nn.AdamWeightDecay(groups, lr, beta1=cfg.momentum)
