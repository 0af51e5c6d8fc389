"""TrainStep: loss scaling, overflow skipping, dynamic scale, accumulation, clipping and EMA."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from resgarden.training.train_step import TrainStep

X = np.random.RandomState(0).randn(8, 4).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)


def _step(**kwargs):
    net = nn.Dense(4, 3)
    net.weight.set_data(ms.Tensor(np.full((3, 4), 0.1, np.float32)))
    net.bias.set_data(ms.Tensor(np.zeros(3, np.float32)))
    step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), nn.SGD(net.trainable_params(), 0.1), **kwargs)
    step.set_train(True)
    return net, step


def _run(step, x=X, y=Y):
    return step(ms.Tensor(x), ms.Tensor(y))


@pytest.fixture(scope="module")
def plain_update():
    net, step = _step()
    _run(step)
    return net.weight.asnumpy()


@pytest.mark.slow
def test_loss_scale_does_not_change_the_update(exec_mode, plain_update):
    net, step = _step(loss_scale=1024.0)
    _run(step)
    np.testing.assert_allclose(net.weight.asnumpy(), plain_update, atol=1e-6)


@pytest.mark.slow
def test_accumulation_equals_one_big_batch(exec_mode, plain_update):
    net, step = _step(accumulation_steps=2)
    _run(step, X[:4], Y[:4])
    np.testing.assert_array_equal(net.weight.asnumpy(), np.full((3, 4), 0.1, np.float32))
    _run(step, X[4:], Y[4:])
    np.testing.assert_allclose(net.weight.asnumpy(), plain_update, atol=1e-6)
    assert int(step.micro_step.asnumpy()) == 2 and not step.accumulated[0].asnumpy().any()


@pytest.mark.slow
def test_overflow_skips_the_update_and_halves_a_dynamic_scale(exec_mode):
    net, step = _step(loss_scale=3e38, dynamic_loss_scale=True)
    _run(step, X * 100)
    np.testing.assert_array_equal(net.weight.asnumpy(), np.full((3, 4), 0.1, np.float32))
    assert float(step.loss_scale.asnumpy()) == pytest.approx(1.5e38)


@pytest.mark.slow
def test_dynamic_scale_grows_after_a_window_of_good_steps(exec_mode):
    _, step = _step(loss_scale=4.0, dynamic_loss_scale=True, scale_window=2)
    _run(step)
    assert float(step.loss_scale.asnumpy()) == 4.0 and int(step.good_steps.asnumpy()) == 1
    _run(step)
    assert float(step.loss_scale.asnumpy()) == 8.0 and int(step.good_steps.asnumpy()) == 0


@pytest.mark.slow
def test_clipping_bounds_the_step(exec_mode, plain_update):
    net, step = _step(clip_norm=1e-3)
    _run(step)
    change = net.weight.asnumpy() - 0.1
    assert np.linalg.norm(change) <= 0.1 * 1e-3 * 1.001  # lr * clip norm (bias shares the norm)
    assert np.abs(plain_update - 0.1).max() > 10 * np.abs(change).max()


@pytest.mark.slow
def test_ema_follows_the_weights_with_warmup(exec_mode):
    net, step = _step(ema_decay=0.9)
    _run(step)
    decay = 0.9 * (1 - math.exp(-1 / 2000))  # mindcv's warm-up after one update
    expected = 0.1 * decay + net.weight.asnumpy() * (1 - decay)
    ema = {p.name: p.asnumpy() for p in step.ema_params}
    np.testing.assert_allclose(ema["ema.weight"], expected, rtol=1e-5)
