"""Optimizers and LR schedules."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from config import parse_config, train_job
from resgarden.training.optim import Lamb, create_optimizer, lr_per_step


def schedule_of(args: list[str]):
    return train_job(parse_config(args)).schedule

@pytest.mark.slow
def test_lamb_matches_the_reference_update(exec_mode):
    net = nn.Dense(3, 2)
    w0 = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    net.weight.set_data(ms.Tensor(w0))
    net.bias.set_data(ms.Tensor(np.zeros(2, np.float32)))
    opt = Lamb([net.weight], learning_rate=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
    g = np.array([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]], np.float32)
    opt((ms.Tensor(g),))
    m, v = 0.1 * g, 0.001 * g * g
    update = (m / 0.1) / (np.sqrt(v / 0.001) + 1e-6) + 0.01 * w0
    trust = np.linalg.norm(w0) / np.linalg.norm(update)
    np.testing.assert_allclose(net.weight.asnumpy(), w0 - 0.1 * trust * update, rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine():
    cfg = parse_config(["--lr=0.4", "--warmup_epochs=1", "--epoch_size=3", "--min_lr=0.0"])
    lrs = lr_per_step(train_job(cfg).schedule, 10)
    assert len(lrs) == 30
    np.testing.assert_allclose(lrs[:10], 0.4 * np.arange(1, 11) / 10, rtol=1e-6)
    assert lrs[10] == pytest.approx(0.4) and lrs[-1] == pytest.approx(0.2 * (1 + math.cos(math.pi * 19 / 20)))


def test_step_and_multistep():
    step = lr_per_step(schedule_of(["--lr=1", "--scheduler=step", "--decay_epochs=2", "--decay_rate=0.5",
                                     "--epoch_size=5"]), 2)
    assert list(step[::2]) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    multi = lr_per_step(schedule_of(["--lr=1", "--scheduler=multistep", "--milestones", "1", "3",
                                      "--decay_rate=0.1", "--epoch_size=4"]), 1)
    assert list(multi) == pytest.approx([1, 0.1, 0.1, 0.01])


def test_no_weight_decay_on_bn_and_bias():
    from models import create_model

    net = create_model("resnet18", num_classes=3)
    cfg = parse_config(["--weight_decay=0.1"])
    opt = create_optimizer(net, train_job(cfg).optim, lr_per_step(train_job(cfg).schedule, 1))
    decay = dict(zip([p.name for p in opt.parameters], opt.decay_flags))
    assert decay["conv1.weight"] and decay["classifier.weight"]
    assert not decay["bn1.gamma"] and not decay["bn1.beta"] and not decay["classifier.bias"]
