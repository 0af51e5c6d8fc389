"""Eval mode's fused conv -> BatchNorm -> [+ residual] -> [ReLU] (one native primitive) against the
separate MindSpore cells: values and gradients per geometry, and every family's logits as a plain
``create_model(name).set_train(False)`` Cell, folded or not."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import models
from models.batchnorm import BatchNorm2d
from models.conv import Conv2d, conv_bn, native_conv_available
from models.fold import fold_batchnorm

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native convolutions unavailable here")

GEOMETRIES = {  # in, out, kernel, stride, padding, groups, bias, relu, residual
    "3x3 relu": (8, 16, 3, 1, 1, 1, False, True, False),
    "1x1 stride 2": (8, 16, 1, 2, 0, 1, False, False, False),
    "grouped stride 2 relu": (16, 32, 3, 2, 1, 4, False, True, False),
    "1x1 residual relu": (16, 32, 1, 1, 0, 1, False, True, True),
    "bias residual": (13, 26, 3, 1, 1, 1, True, False, True),
}


def randomise_batchnorms(net: nn.Cell, seed: int = 0) -> None:
    """Running statistics, scales and shifts away from their initial 0 / 1, as a trained net has."""
    rng = np.random.RandomState(seed)
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            size = cell.gamma.shape
            for param, values in ((cell.moving_mean, rng.randn(*size) * 0.5), (cell.moving_variance, rng.uniform(0.5, 2, size)),
                                  (cell.gamma, rng.uniform(0.5, 1.5, size)), (cell.beta, rng.randn(*size) * 0.2)):
                param.set_data(ms.Tensor(values.astype(np.float32)))


class ConvBn(nn.Cell):
    def __init__(self, geometry: tuple) -> None:
        super().__init__()
        cin, cout, k, stride, pad, groups, bias, self.relu, self.residual = geometry
        self.conv = Conv2d(cin, cout, k, stride=stride, pad_mode="pad" if pad else "valid", padding=pad,
                           group=groups, has_bias=bias)
        self.bn = BatchNorm2d(cout)

    def construct(self, x, shortcut):
        out = conv_bn(self.conv, self.bn, x, self.relu, shortcut if self.residual else None)
        return (out * out).sum()


def _gradients(net: ConvBn, x, shortcut):
    grad = ms.value_and_grad(net, grad_position=(0, 1), weights=net.trainable_params())
    grad(x, shortcut)  # the second call must agree too (compiled graphs re-run)
    loss, (inputs, weights) = grad(x, shortcut)
    return [loss.asnumpy()] + [g.asnumpy() for g in inputs + weights]


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.slow
def test_fused_matches_separate_cells(geometry, exec_mode):
    fused = ConvBn(geometry)
    randomise_batchnorms(fused)
    fused.set_train(False)
    reference = ConvBn(geometry)
    for name, param in reference.parameters_and_names():
        param.set_data(dict(fused.parameters_and_names())[name].value())
    reference.conv.native = None  # conv_bn then runs the separate MindSpore cells
    reference.set_train(False)
    rng = np.random.RandomState(1)
    x = ms.Tensor(rng.randn(2, geometry[0], 11, 9).astype(np.float32))
    out_size = [(s + 2 * geometry[4] - geometry[2]) // geometry[3] + 1 for s in (11, 9)]
    shortcut = ms.Tensor(rng.randn(2, geometry[1], *out_size).astype(np.float32))
    results = [_gradients(net, x, shortcut) for net in (fused, reference)]
    names = ["loss", "dx", "dshortcut"] + [p.name for p in fused.trainable_params()]
    for name, ours, expected in zip(names, *results):
        np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-4 * max(1.0, np.abs(expected).max()),
                                   err_msg=name)


@pytest.mark.parametrize("name", ["resnet50", "res2net50_v1b", "resnest50", "resnext50_32x4d", "resnet18"])
@pytest.mark.slow
def test_eval_model_matches_separate_cells(name, pynative_mode):
    net = models.create_model(name, num_classes=10)
    randomise_batchnorms(net)
    net.set_train(False)
    x = ms.Tensor(np.random.RandomState(2).randn(2, 3, 64, 64).astype(np.float32))
    fused = net(x).asnumpy()
    convs = [cell for _, cell in net.cells_and_names() if isinstance(cell, Conv2d)]
    natives = [conv.native for conv in convs]
    for conv in convs:
        conv.native = None
    separate = net(x).asnumpy()
    scale = np.abs(separate).max()
    np.testing.assert_allclose(fused, separate, rtol=1e-4, atol=1e-4 * scale)
    for conv, native in zip(convs, natives):
        conv.native = native
    fold_batchnorm(net)
    np.testing.assert_allclose(net(x).asnumpy(), separate, rtol=1e-4, atol=1e-4 * scale)


def test_checkpoint_names_unchanged(tmp_path):
    net = models.create_model("res2net50_v1b", num_classes=10)
    names = [p.name for p in net.get_parameters()]
    assert "conv1.0.weight" in names and "conv1.4.moving_mean" in names  # the deep stem's SequentialCell
    assert "layer2.0.down_sample.1.weight" in names and "layer2.0.down_sample.2.gamma" in names
    assert len(names) == len(set(names))
