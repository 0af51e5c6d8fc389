"""The native radix pool / combine of ResNeSt's split attention against MindSpore's reshape / sum /
mean / multiply: values and gradients per op (radix 2 and 4, both modes, NCHW and the blocked
layout), and a ResNeSt training step and eval forward with and without them."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import models
from tests.helpers import step_gradients
from models.blocked import blocked_width, layout_ops
from models.conv import native_conv_available
from models.radix import RadixReduce

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native kernels unavailable here")


class Reductions(nn.Cell):
    """A weighted loss of both reductions, so every element of both gradients matters; with
    ``blocked``, the reductions see x in the blocked layout (models.blocked)."""

    def __init__(self, reduce: RadixReduce, blocked: bool = False) -> None:
        super().__init__()
        self.reduce = reduce
        self.blocked = blocked
        self.to_blocked, self.to_plain = layout_ops()

    def construct(self, x, attn):
        if self.blocked:
            x = self.to_blocked(x)
        pooled, combined = self.reduce.pool(x), self.reduce.combine(x, attn)
        if self.blocked:
            combined = self.to_plain(combined)
        weights = ops.arange(combined.size, dtype=ms.float32).reshape(combined.shape) / combined.size
        return (pooled * pooled).sum() + (combined * combined * weights).sum(), pooled, combined


def _run(reduce: RadixReduce, x, attn, blocked: bool = False):
    net = Reductions(reduce, blocked)
    (_, pooled, combined), grads = ms.value_and_grad(net, grad_position=(0, 1), has_aux=False)(x, attn)
    return [pooled.asnumpy(), combined.asnumpy(), grads[0].asnumpy(), grads[1].asnumpy()]


@pytest.mark.parametrize("radix, shape", [(2, (3, 10, 7, 6)), (4, (2, 12, 5, 9)), (2, (1, 4, 1, 1))],
                         ids=["radix2", "radix4", "1x1"])
@pytest.mark.slow
def test_matches_mindspore_ops(radix, shape, exec_mode):
    rng = np.random.RandomState(radix)
    x = ms.Tensor(rng.randn(*shape).astype(np.float32))
    attn = ms.Tensor(rng.rand(shape[0], shape[1], 1, 1).astype(np.float32))
    native = RadixReduce(radix)
    assert native.native is not None
    reference = RadixReduce(radix)
    reference.native = None
    names = ["pool", "combine", "dx", "dattn"]
    for name, ours, expected in zip(names, _run(native, x, attn), _run(reference, x, attn)):
        assert ours.shape == expected.shape, name
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()),
                                   err_msg=name)


@pytest.mark.parametrize("radix, splits, size", [(2, 2, (5, 7)), (4, 1, (3, 3)), (2, 1, (1, 1))],
                         ids=["radix2", "radix4", "1x1"])
@pytest.mark.slow
def test_blocked_layout_matches_mindspore_ops(radix, splits, size, exec_mode):
    # every split `splits` whole blocks of the layout
    shape = (3, radix * splits * blocked_width(), *size)
    rng = np.random.RandomState(radix + splits)
    x = ms.Tensor(rng.randn(*shape).astype(np.float32))
    attn = ms.Tensor(rng.rand(shape[0], shape[1], 1, 1).astype(np.float32))
    reference = RadixReduce(radix)
    reference.native = None
    names = ["pool", "combine", "dx", "dattn"]
    for name, ours, expected in zip(names, _run(RadixReduce(radix), x, attn, blocked=True),
                                    _run(reference, x, attn)):
        assert ours.shape == expected.shape, name
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()),
                                   err_msg=name)


def _resnest_tiny() -> nn.Cell:
    from models.resnest import ResNestBottleneck
    from models.resnet import ResNet

    return ResNet(ResNestBottleneck, (1, 1, 1, 1), deep_stem=True, stem_width=16, avg_down=True,
                  block_args=dict(radix=2, avd=True), num_classes=10)


def _radix_cells(net: nn.Cell) -> list[RadixReduce]:
    return [cell for _, cell in net.cells_and_names() if isinstance(cell, RadixReduce)]


@pytest.mark.slow
def test_resnest_step_matches_mindspore_ops(pynative_mode):
    rng = np.random.RandomState(5)
    x = ms.Tensor(rng.randn(2, 3, 64, 64).astype(np.float32))
    labels = ms.Tensor(rng.randint(0, 10, 2).astype(np.int32))
    results = []
    for native in (True, False):
        ms.set_seed(0)
        net = _resnest_tiny()
        cells = _radix_cells(net)
        assert len(cells) == 4 and all(cell.native is not None for cell in cells)
        if not native:  # MindSpore's ops on an NCHW trunk
            net.blocked = False
            for cell in cells:
                cell.native = None
        # BatchNorm on running statistics: batch statistics of a random net on small maps amplify
        # float32 rounding so much that MindSpore's own conv vs the native one differ by 2 % in layer2
        for _, cell in net.cells_and_names():
            if isinstance(cell, nn.BatchNorm2d):
                cell.use_batch_statistics = False
        loss, grads = step_gradients(net, x, labels)
        net.set_train(False)
        results.append((loss, grads, net(x).asnumpy()))
    (loss, grads, logits), (loss_ref, grads_ref, logits_ref) = results
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * max(1e-3, np.abs(g_ref).max()))
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4 * np.abs(logits_ref).max())


def test_radix_one_has_no_reduction():
    from models.resnest import SplitAttn

    assert SplitAttn(16, 16, radix=1).radix_reduce is None
    assert models.create_model("resnest50", num_classes=10).layer1[0].conv2.radix_reduce.native is not None
