"""Optimizers and LR schedules."""
from __future__ import annotations

import json
import math
import subprocess

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from config import parse_config, train_job
from resgarden.training.optim import Lamb, create_optimizer, lr_per_step
from tests.test_timm_parity import torch_python


def schedule_of(args: list[str]):
    return train_job(parse_config(args)).schedule

W0 = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
B0 = np.array([0.3, -0.2], np.float32)
# a gradient per step: the first with a global norm above 1 (clipped), the others below
GRADS = [(np.array([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]], np.float32), np.array([0.4, -0.7], np.float32)),
         (np.array([[0.05, 0.1, -0.2], [0.3, -0.1, 0.0]], np.float32), np.array([-0.1, 0.2], np.float32)),
         (np.array([[-0.2, 0.05, 0.1], [0.0, 0.2, 0.1]], np.float32), np.array([0.05, 0.05], np.float32))]
LRS = [0.1, 0.05, 0.02]
TIMM_LAMB = """
import json, sys, torch
from timm.optim import Lamb
case = json.loads(sys.stdin.read())
w = torch.nn.Parameter(torch.tensor(case["w"]))
b = torch.nn.Parameter(torch.tensor(case["b"]))
opt = Lamb([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}], lr=case["lrs"][0])
out = []
for (gw, gb), lr in zip(case["grads"], case["lrs"]):
    for group in opt.param_groups:
        group["lr"] = lr
    w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
    opt.step()
    out.append([w.detach().tolist(), b.detach().tolist()])
print(json.dumps(out))
"""


def _our_lamb_steps() -> list[tuple[np.ndarray, np.ndarray]]:
    """Our Lamb over a decayed weight and an undecayed bias (param groups as create_optimizer makes)."""
    net = nn.Dense(3, 2)
    net.weight.set_data(ms.Tensor(W0))
    net.bias.set_data(ms.Tensor(B0))
    opt = Lamb([{"params": [net.weight], "weight_decay": 0.01}, {"params": [net.bias], "weight_decay": 0.0}],
               learning_rate=LRS, beta1=0.9, beta2=0.999, eps=1e-6)
    out = []
    for gw, gb in GRADS:
        opt((ms.Tensor(gw), ms.Tensor(gb)))
        out.append((net.weight.asnumpy().copy(), net.bias.asnumpy().copy()))
    return out


def _reference_lamb_steps() -> list[tuple[np.ndarray, np.ndarray]]:
    """timm's Lamb by hand: global-norm clipping at 1, bias-corrected moments, the trust ratio on the
    decayed weight only."""
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    state = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    out = []
    for step, ((gw, gb), lr) in enumerate(zip(GRADS, LRS), start=1):
        norm = np.sqrt(np.sum(gw.astype(np.float64) ** 2) + np.sum(gb.astype(np.float64) ** 2))
        gw, gb = gw / max(norm, 1.0), gb / max(norm, 1.0)
        updates = []
        for i, g in ((0, gw), (2, gb)):
            state[i] = 0.9 * state[i] + 0.1 * g
            state[i + 1] = 0.999 * state[i + 1] + 0.001 * g * g
            updates.append((state[i] / (1 - 0.9 ** step)) / (np.sqrt(state[i + 1] / (1 - 0.999 ** step)) + 1e-6))
        update_w = updates[0] + 0.01 * w
        w = w - lr * np.linalg.norm(w) / np.linalg.norm(update_w) * update_w
        b = b - lr * updates[1]
        out.append((w, b))
    return out


@pytest.mark.slow
def test_lamb_matches_timms_update_by_hand(exec_mode):
    for (w, b), (want_w, want_b) in zip(_our_lamb_steps(), _reference_lamb_steps()):
        np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lamb_matches_timms_lamb():
    python = torch_python()
    if python is None:
        pytest.skip("no torch + timm (.venv-torch)")
    case = dict(w=W0.tolist(), b=B0.tolist(), grads=[[gw.tolist(), gb.tolist()] for gw, gb in GRADS], lrs=LRS)
    theirs = json.loads(subprocess.run([python, "-c", TIMM_LAMB], input=json.dumps(case), capture_output=True,
                                       text=True, check=True, timeout=120).stdout)
    for (w, b), (want_w, want_b) in zip(_our_lamb_steps(), theirs):
        np.testing.assert_allclose(w, np.array(want_w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, np.array(want_b), rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine():
    cfg = parse_config(["--lr=0.4", "--warmup_epochs=1", "--epoch_size=3", "--min_lr=0.0"])
    lrs = lr_per_step(train_job(cfg).schedule, 10)
    assert len(lrs) == 30
    np.testing.assert_allclose(lrs[:10], 0.4 * np.arange(0, 10) / 10, rtol=1e-6)
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


@pytest.mark.slow
def test_nesterov_is_nesterov(exec_mode):
    """--opt=nesterov: PyTorch's SGD(nesterov=True) update, by hand (MindSpore 2.10's CPU Momentum
    kernel ignores use_nesterov and ran plain momentum)."""
    from resgarden.training.optim import NesterovMomentum

    net = nn.Dense(3, 2)
    net.weight.set_data(ms.Tensor(W0))
    opt = NesterovMomentum([net.weight], learning_rate=0.1, momentum=0.9)
    w, moment = W0.astype(np.float64), np.zeros_like(W0, np.float64)
    for gw, _ in GRADS:
        opt((ms.Tensor(gw),))
        moment = 0.9 * moment + gw
        w = w - 0.1 * (gw + 0.9 * moment)
    np.testing.assert_allclose(net.weight.asnumpy(), w, rtol=1e-6, atol=1e-7)
