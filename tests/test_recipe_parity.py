"""The nine mindcv recipes train as mindcv trains them: our schedule, optimizer, loss and training step
(built by ``resgarden.training.trainer`` from the recipe) against mindcv 0.3's own ``create_scheduler``,
``create_optimizer``, ``create_loss`` and ``create_trainer``, set up as mindcv's ``train.py`` sets them
up for the recipe's mindcv YAML.

Both sides get the same initial weights and the same batches (tensors fed directly; with mixup/cutmix
both draw the same mixing from mindcv's ``Mixup``, which mindcv's loader runs without label smoothing
and our pipeline with it, leaving it to the loss or to the targets). Both run float32 (O0) with the
recipe's loss scale; the steps cross the end of the warm-up and several epoch boundaries (3 steps per
epoch). The LR of every step of the whole recipe, the weights and the BatchNorm statistics after every
step must be equal within 1e-5 relative (measured: 4e-8, and 9e-7 with mixup/cutmix).

The networks compute with MindSpore's own kernels on both sides (our native CPU kernels give the
same outputs to ~1e-6, tested elsewhere, but a random-init net at LR 0.1 turns that into 1e-2 within
two steps: the comparison would test chaos, not the recipe).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import types

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import models
from config import parse_config, train_job
from models.conv import native_conv_disabled
from resgarden.data.datasets import mixing
from resgarden.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, os.path.join(REPO, "configs"))
                 for p in glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")) if "Source: mindcv" in open(p).read())
STEPS_PER_EPOCH, STEPS, CLASSES, BATCH = 3, 24, 4, 8
TOLERANCE = 1e-5
MINDCV_SCHEDULER = {"cosine": "cosine_decay", "step": "step_decay", "multistep": "multi_step_decay"}


class TinyNet(nn.Cell):
    """conv -> BN -> ReLU -> global pool -> classifier: every kind of parameter a recipe decays."""

    pretrained_cfg = types.SimpleNamespace(build={})  # how the trainer's EMA copy is built (not run here)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1, has_bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.classifier = nn.Dense(8, CLASSES)

    def construct(self, x):
        return self.classifier(ops.mean(ops.relu(self.bn1(self.conv1(x))), axis=(2, 3)))


def _job(recipe: str, *overrides: str):
    return train_job(parse_config(["-c", os.path.join(REPO, "configs", recipe), f"--num_classes={CLASSES}",
                                   "--amp_level=O0", "--model=resnet18", *overrides]))


def _ours(job, net: nn.Cell) -> trainer.Run:
    run = trainer.Run(job=job, cluster=None, loader=job.loader, train_split=None, val_split=None,
                      num_classes=CLASSES, steps_per_epoch=STEPS_PER_EPOCH)
    run.model = net
    trainer._build_train_cell(run)
    return run


def _mindcv(job, net: nn.Cell):
    """mindcv's pieces as its train.py builds them from the recipe (no label smoothing in its Mixup:
    the loss smooths), and its training-step cell."""
    from mindcv.loss import create_loss
    from mindcv.optim import create_optimizer
    from mindcv.scheduler import create_scheduler
    from mindcv.utils import create_trainer
    from mindcv.utils.trainer_factory import require_customized_train_step

    schedule, optim, step = job.schedule, job.optim, job.step
    warmup = int(schedule.warmup_epochs)
    lrs = create_scheduler(STEPS_PER_EPOCH, MINDCV_SCHEDULER[schedule.scheduler], lr=schedule.lr,
                           min_lr=schedule.min_lr, warmup_epochs=warmup,
                           decay_epochs=schedule.epochs - warmup if schedule.scheduler == "cosine" else
                           schedule.decay_epochs, decay_rate=schedule.decay_rate,
                           milestones=list(schedule.milestones), num_epochs=schedule.epochs)
    scale_type = "dynamic" if step.dynamic_loss_scale else "fixed"
    drop_overflow = step.dynamic_loss_scale  # the recipes: dynamic scales drop overflowed steps, fixed ones do not
    if scale_type == "dynamic" and ms.get_context("device_target") == "CPU":
        # MindSpore builds no dynamic loss scale on CPU (amp.build_train_network refuses it); in float32 no
        # step overflows and a dynamic scale keeps its value for 2000 steps, so its fixed twin trains alike
        scale_type, drop_overflow = "fixed", False
    ema, clip = step.ema_decay > 0, step.clip_norm > 0
    custom = require_customized_train_step(ema, clip, step.accumulation, None)
    optimizer = create_optimizer(net.trainable_params(), opt=optim.opt, lr=lrs, weight_decay=optim.weight_decay,
                                 momentum=optim.momentum, nesterov=optim.opt == "nesterov",
                                 weight_decay_filter="norm_and_bias" if optim.filter_bias_and_bn else "disable",
                                 loss_scale=step.loss_scale if scale_type == "fixed" and not drop_overflow
                                 and not custom else 1.0)
    loss = create_loss(name="CE", label_smoothing=step.label_smoothing)
    model = create_trainer(net, loss, optimizer, None, "O0", None, scale_type, step.loss_scale, drop_overflow,
                           ema, step.ema_decay, clip, step.clip_norm or 15.0, step.accumulation)
    cell = model._train_network
    cell.set_train(True)
    return lrs, cell


def _batches(job, steps: int, size: int):
    """(images, our targets, mindcv's targets) per step: integer labels, or the same mixed batch."""
    rng = np.random.RandomState(0)
    mix = job.loader.mixing
    for step in range(steps):
        images = rng.randn(BATCH, 3, size, size).astype(np.float32)
        labels = rng.randint(0, CLASSES, BATCH).astype(np.int32)
        if not mix.enabled:
            yield images, labels, images, labels
            continue
        theirs = mixing(dataclasses.replace(mix, label_smoothing=0.0), CLASSES, 0)
        ours = mixing(mix, CLASSES, 0)
        np.random.seed(1000 + step)  # Mixup draws from numpy's global stream: the same draw on both sides
        our_images, our_targets = ours(images.copy(), labels.copy())
        np.random.seed(1000 + step)
        their_images, their_targets = theirs(images.copy(), labels.copy())
        yield our_images, our_targets.astype(np.float32), their_images, their_targets.astype(np.float32)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-3))


def _state(net: nn.Cell, cell: nn.Cell) -> dict[str, np.ndarray]:
    """Weights, BN statistics and, where kept, their EMA (``ema.<name>`` on both sides)."""
    state = {name: p.asnumpy() for name, p in net.parameters_dict().items()}
    ema = getattr(cell, "ema_params", None) or getattr(cell, "ema_weight", None) or ()
    state.update({p.name: p.asnumpy() for p in ema})
    return state


def _twins(make_ours=TinyNet, make_theirs=TinyNet) -> tuple[nn.Cell, nn.Cell]:
    """Our network and mindcv's side's, ours holding the other's initial weights."""
    ms.set_seed(0)
    ours_net, their_net = make_ours(), make_theirs()
    for name, param in ours_net.parameters_dict().items():
        param.set_data(ms.Tensor(their_net.parameters_dict()[name].asnumpy()))
    return ours_net, their_net


def _compare(job, make_ours=TinyNet, make_theirs=TinyNet, their_job=None, mutate=None, steps: int = STEPS,
             size: int = 16) -> float:
    """Train both sides from the same weights on the same batches (mindcv's from ``their_job``, by
    default the same recipe); the largest relative difference of the LR of every step of the recipe,
    the weights and the BN statistics after each step. ``mutate`` changes our network by hand."""
    ours_net, their_net = _twins(make_ours, make_theirs)
    if mutate is not None:
        mutate(ours_net)
    run = _ours(job, ours_net)
    their_lrs, their_cell = _mindcv(their_job or job, their_net)
    assert len(run.lrs) == len(their_lrs) == job.schedule.epochs * STEPS_PER_EPOCH
    worst = _relative(np.asarray(run.lrs, np.float64), np.asarray(their_lrs, np.float64))
    for our_x, our_y, their_x, their_y in _batches(job, steps, size):
        run.train_cell(ms.Tensor(our_x), ms.Tensor(our_y))
        their_cell(ms.Tensor(their_x), ms.Tensor(their_y))
        ours, theirs = _state(ours_net, run.train_cell), _state(their_net, their_cell)
        assert ours.keys() == theirs.keys()
        worst = max(worst, max(_relative(ours[k], theirs[k]) for k in theirs))
    assert float(run.train_cell.loss_scale.asnumpy()) == job.step.loss_scale  # no overflow in float32
    return worst


@pytest.fixture(autouse=True)
def _pynative():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)


def test_the_nine_mindcv_recipes_are_compared():
    assert len(RECIPES) == 9


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_trains_as_mindcv_trains_it(recipe):
    assert _compare(_job(recipe)) <= TOLERANCE


def _bn_momentum(value: float):
    def mutate(net: nn.Cell) -> None:
        for _, cell in net.cells_and_names():
            if isinstance(cell, nn.BatchNorm2d):
                cell.momentum = value
                if hasattr(cell, "bn_train"):
                    cell.bn_train.add_prim_attr("momentum", value)
    return mutate


@pytest.mark.slow
def test_the_ema_of_a_recipe_is_mindcvs():
    """--ema (no recipe of the nine sets it): the average of weights and BN statistics, warmed up as
    mindcv's ``decay * (1 - exp(-t / 2000))``, on mindcv's customised training step."""
    assert _compare(_job("res2net/res2net50_ascend.yaml", "--ema", "--ema_decay=0.9999")) <= TOLERANCE


# Changed by hand on our side only, each must show: (recipe, our setting, mutation of our net, what)
MUTATIONS = [
    ("res2net/res2net50_ascend.yaml", "--filter_bias_and_bn=True", None, "weight-decay filter"),
    ("res2net/res2net50_ascend.yaml", "--opt=nesterov", None, "Nesterov"),
    ("res2net/res2net50_ascend.yaml", "--warmup_epochs=3", None, "warm-up length"),
    ("res2net/res2net50_ascend.yaml", "--label_smoothing=0.05", None, "label smoothing"),
    ("res2net/res2net50_gpu.yaml", "--label_smoothing=0.05", None, "label smoothing under mixup"),
    ("res2net/res2net50_ascend.yaml", None, _bn_momentum(0.99), "BN momentum"),
]
EMA_MUTATION = ("res2net/res2net50_ascend.yaml", "--ema_decay=0.5", "EMA decay")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, change, mutate, what", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_the_comparison_notices_a_setting_changed_by_hand(recipe, change, mutate, what):
    difference = _compare(_job(recipe, *([change] if change else [])), their_job=_job(recipe), mutate=mutate)
    assert difference > 10 * TOLERANCE, f"{what} changed by hand went unnoticed: {difference:.1e}"


@pytest.mark.slow
def test_the_comparison_notices_the_ema_decay_changed_by_hand():
    recipe, change, what = EMA_MUTATION
    difference = _compare(_job(recipe, "--ema", change), their_job=_job(recipe, "--ema", "--ema_decay=0.9999"))
    assert difference > 10 * TOLERANCE, f"{what} changed by hand went unnoticed: {difference:.1e}"


def _our_resnet18() -> nn.Cell:
    with native_conv_disabled():  # MindSpore's kernels, as mindcv's model
        return models.create_model("resnet18", num_classes=CLASSES)


def _mindcv_resnet18() -> nn.Cell:
    from mindcv.models import create_model

    return create_model("resnet18", num_classes=CLASSES)


@pytest.mark.slow
def test_our_resnet18_trains_as_mindcvs_resnet18():
    """The same comparison with the models themselves (ours holding mindcv's initial weights) for 6
    steps of a recipe: their BatchNorms, pools and shortcuts train alike."""
    assert _compare(_job("res2net/res2net50_ascend.yaml"), _our_resnet18, _mindcv_resnet18, steps=6, size=32) \
        <= TOLERANCE


@pytest.mark.slow
def test_where_we_differ_an_overflowed_step_is_skipped_under_a_fixed_scale():
    """The one deliberate difference in training: under a fixed loss scale without
    ``drop_overflow_update`` (eight of the nine recipes) mindcv applies a step whose gradients are
    not finite, which leaves NaN in every weight it reaches; ours skips it and counts it. (Both
    sides' BatchNorms take the batch's statistics in the forward pass all the same.)"""
    job = _job("res2net/res2net50_ascend.yaml")
    ours_net, their_net = _twins()
    run = _ours(job, ours_net)
    _, their_cell = _mindcv(job, their_net)
    images, labels, _, _ = next(_batches(job, 1, 16))
    for cell in (run.train_cell, their_cell):  # a first step, then one with an infinite pixel
        cell(ms.Tensor(images), ms.Tensor(labels))
    before = {p.name: p.asnumpy().copy() for p in ours_net.trainable_params()}
    images[0, 0, 0, 0] = np.inf
    for cell in (run.train_cell, their_cell):
        cell(ms.Tensor(images), ms.Tensor(labels))
    assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in ours_net.trainable_params())
    assert int(run.train_cell.skipped_steps.asnumpy()) == 1
    assert np.isnan(their_net.conv1.weight.asnumpy()).all()
