"""The native 3x3 max pool, on NCHW and blocked activations, against MindSpore's pools of pool3x3
(both padding modes, strides 1 and 2, even and odd sizes, both execution modes), and the native
average pool of blocked activations against MindSpore's on NCHW (pool3x3's and the avg-pool
shortcut's): values and input gradients; and that the models use them."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import models
from models.blocked import blocked_width, layout_ops
from models.conv import native_conv_available
from models.layers import pool3x3
from models.pooling import AvgPool, MaxPool3x3

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native kernels unavailable here")


class Weighted(nn.Cell):
    """A weighted sum of the pool's output; with ``blocked``, the pool sees x in the blocked layout."""

    def __init__(self, pool: nn.Cell, blocked: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.blocked = blocked
        self.to_blocked, self.to_plain = layout_ops()

    def construct(self, x):
        y = self.to_plain(self.pool(self.to_blocked(x))) if self.blocked else self.pool(x)
        weights = ops.arange(y.size, dtype=ms.float32).reshape(y.shape) / y.size
        return (y * weights).sum(), y


@pytest.mark.parametrize("blocked", [False, True], ids=["nchw", "blocked"])
@pytest.mark.parametrize("pad_mode", ["pad", "same"])
@pytest.mark.parametrize("stride, size", [(2, (12, 12)), (2, (11, 9)), (1, (7, 8))], ids=["even", "odd", "stride1"])
def test_matches_mindspore_pool(pad_mode, stride, size, blocked, exec_mode):
    native = pool3x3("max", stride, pad_mode)
    assert isinstance(native, MaxPool3x3)
    channels = 2 * blocked_width() if blocked else 3
    x = ms.Tensor(np.random.RandomState(stride + size[1]).randn(2, channels, *size).astype(np.float32))
    results = []
    for net in (Weighted(native, blocked), Weighted(native.fallback)):
        (_, y), dx = ms.value_and_grad(net, grad_position=0, has_aux=True)(x)
        results.append((y.asnumpy(), dx.asnumpy()))
    (y, dx), (y_ref, dx_ref) = results
    assert y.shape == y_ref.shape
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("blocked", [False, True], ids=["nchw", "blocked"])
@pytest.mark.parametrize("pad_mode", ["pad", "same"])
def test_ties_go_where_mindspore_sends_them(pad_mode, blocked):
    # post-ReLU maps are full of equal values (zeros): the gradient goes to the first in window order
    channels = blocked_width() if blocked else 3
    x = ms.Tensor(np.maximum(np.random.RandomState(0).randn(2, channels, 12, 12), 0).round().astype(np.float32))
    native = pool3x3("max", 2, pad_mode)
    grads = [ms.value_and_grad(net, grad_position=0, has_aux=True)(x)[1].asnumpy()
             for net in (Weighted(native, blocked), Weighted(native.fallback))]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)  # overlapping windows: sum order


AVERAGE_POOLS = {
    "avd, pad": lambda: pool3x3("avg", 2, "pad"),
    "avd, same": lambda: pool3x3("avg", 2, "same"),
    "stride 1, pad": lambda: pool3x3("avg", 1, "pad"),
    "shortcut": lambda: models.resnet.make_shortcut(16, 16, 2, avg_down=True)[0],
}


@pytest.mark.parametrize("make", AVERAGE_POOLS.values(), ids=AVERAGE_POOLS.keys())
@pytest.mark.parametrize("size", [(12, 12), (11, 9)], ids=["even", "odd"])
def test_blocked_average_pool_matches_mindspore_pool(make, size, exec_mode):
    native = make()
    assert isinstance(native, AvgPool)
    x = ms.Tensor(np.random.RandomState(size[1]).randn(2, 2 * blocked_width(), *size).astype(np.float32))
    results = []
    for net in (Weighted(native, blocked=True), Weighted(native.fallback)):
        (_, y), dx = ms.value_and_grad(net, grad_position=0, has_aux=True)(x)
        results.append((y.asnumpy(), dx.asnumpy()))
    (y, dx), (y_ref, dx_ref) = results
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_models_use_them():
    for name in ("resnet50", "res2net50"):
        assert isinstance(models.create_model(name, num_classes=10).max_pool, MaxPool3x3), name
    resnest = models.create_model("resnest50", num_classes=10)
    assert isinstance(resnest.layer2[0].avd_layer, AvgPool) and isinstance(resnest.layer2[0].down_sample[0], AvgPool)
