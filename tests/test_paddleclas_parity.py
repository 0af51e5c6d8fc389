"""The PaddleClas recipes' learning rate at every step and the reach of their weight decay, against
references written from PaddleClas's and Paddle's own source (PaddlePaddle itself is not installed):

- ``ppcls/optimizer/learning_rate.py`` (PaddleClas, commit 0776f1c7): ``Cosine`` builds
  ``CosineAnnealingDecay(T_max=(epochs - warmup_epoch) * step_each_epoch)`` and ``Piecewise`` a
  ``PiecewiseDecay(boundaries=[e * step_each_epoch for e in decay_epochs], values)``; both step per
  iteration (``by_epoch`` False) and add no warm-up at ``warmup_epoch`` 0.
- ``python/paddle/optimizer/lr.py`` (Paddle, commit 7cecb18b): ``LRScheduler`` starts at
  ``last_epoch`` 0 with ``base_lr`` and steps once per iteration; ``CosineAnnealingDecay.get_lr`` is
  the recursion below, not the closed form; ``PiecewiseDecay.get_lr`` returns the value of the first
  boundary above the step.
- ``ppcls/arch/backbone/model_zoo/resnest.py`` (commit 23a2b595): ``ConvBNLayer`` and the shortcut
  BatchNorm give their scale and offset ``ParamAttr(regularizer=L2Decay(0.0))``; every other parameter
  takes the optimizer's ``L2`` regulariser. ``res2net.py`` and the ResNet's BatchNorms set none.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

import models
from config import parse_config, train_job
from resgarden.training.optim import lr_per_step, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 7


def _paddle_cosine(base_lr: float, t_max: int, eta_min: float, steps: int) -> list[float]:
    """CosineAnnealingDecay as Paddle computes it: each LR from the previous one."""
    lrs = []
    for last_epoch in range(steps):
        if last_epoch == 0:
            lr = base_lr
        elif (last_epoch - 1 - t_max) % (2 * t_max) == 0:
            lr = lrs[-1] + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * last_epoch / t_max)) / (1 + math.cos(math.pi * (last_epoch - 1) / t_max)) \
                * (lrs[-1] - eta_min) + eta_min
        lrs.append(lr)
    return lrs


def _paddle_piecewise(boundaries: list[int], values: list[float], steps: int) -> list[float]:
    return [next((v for b, v in zip(boundaries, values) if step < b), values[-1]) for step in range(steps)]


# recipe -> the PaddleClas schedule its YAML names: (name, arguments)
PADDLECLAS = {
    "resnet/resnet50_paddleclas_gpu.yaml": ("Piecewise", dict(decay_epochs=[30, 60, 90],
                                                             values=[0.1, 0.01, 0.001, 0.0001], epochs=120)),
    "resnest/resnest50_paddleclas_gpu.yaml": ("Cosine", dict(learning_rate=0.1, eta_min=0.0, epochs=300)),
    "res2net/res2net50_14w_8s_gpu.yaml": ("Cosine", dict(learning_rate=0.1, eta_min=0.0, epochs=200)),
}


def _job(recipe: str):
    return train_job(parse_config(["-c", os.path.join(REPO, "configs", recipe)]))


@pytest.mark.parametrize("recipe", sorted(PADDLECLAS))
def test_the_learning_rate_of_every_step_is_paddleclass(recipe):
    name, args = PADDLECLAS[recipe]
    steps = args["epochs"] * STEPS_PER_EPOCH
    if name == "Cosine":
        theirs = _paddle_cosine(args["learning_rate"], args["epochs"] * STEPS_PER_EPOCH, args["eta_min"], steps)
    else:
        theirs = _paddle_piecewise([e * STEPS_PER_EPOCH for e in args["decay_epochs"]], args["values"], steps)
    ours = lr_per_step(_job(recipe).schedule, STEPS_PER_EPOCH)
    assert len(ours) == steps
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def _decayed(model: str, recipe: str) -> dict[str, bool]:
    net = models.create_model(model, num_classes=1000)
    job = _job(recipe)
    flags = {}
    for group in param_groups(net, job.optim, np.zeros(1, np.float32))[:-1]:
        for p in group["params"]:
            flags[p.name] = group["weight_decay"] > 0
    return flags


def test_resnest_weight_decay_reaches_what_paddleclas_decays_but_biases():
    """PaddleClas exempts ResNeSt's BatchNorms (L2Decay(0.0)); ours exempts them and every bias: the
    classifier's, and the split attention's, which PaddleClas's ResNeSt does not have (its attention
    convolutions have none). 33 tensors, 10,440 of 27,483,240 values, stay undecayed."""
    flags = _decayed("resnest50", "resnest/resnest50_paddleclas_gpu.yaml")
    paddle = {name: not name.endswith((".gamma", ".beta")) for name in flags}  # L2Decay(0.0) on BN only
    differ = sorted(name for name in flags if flags[name] != paddle[name])
    assert len(differ) == 33 and all(name.endswith(".bias") for name in differ), differ
    assert all(not flags[name] for name in differ)  # where they differ, ours leaves the bias undecayed
    assert {n for n in flags if n.endswith((".gamma", ".beta"))} <= {n for n in flags if not flags[n]}


@pytest.mark.parametrize("model, recipe", [("resnet50", "resnet/resnet50_paddleclas_gpu.yaml"),
                                           ("res2net50_14w_8s", "res2net/res2net50_14w_8s_gpu.yaml")])
def test_resnet_and_res2net_decay_every_parameter_as_paddleclas(model, recipe):
    assert all(_decayed(model, recipe).values())
