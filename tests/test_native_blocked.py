"""The blocked activation layout (models.blocked): the native convolutions and BatchNorms on blocked
tensors against the same computation on NCHW ones, values and every gradient; the layout
conversions; the fallbacks; and whole training steps of the trunks that use it against the NCHW
trunk."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import models
from models.batchnorm import BatchNorm2d
from models.blocked import blocked_width, layout_ops
from models.conv import Conv2d, native_conv_available
from models.layers import DropPath
from models.res2net import Bottle2neck
from models.resnest import ResNestBottleneck
from models.resnet import BasicBlock, Bottleneck, ResNet, make_shortcut
from tests.helpers import assert_same_step, pytest_under_avx2_cap, step_results

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native kernels unavailable here")

GEOMETRIES = {  # in, out, kernel, stride, padding, groups[, dilation]
    "1x1": (32, 64, 1, 1, 0, 1),
    "1x1 stride 2": (32, 64, 1, 2, 0, 1),
    "3x3": (32, 32, 3, 1, 1, 1),
    "3x3 stride 2": (32, 48, 3, 2, 1, 1),
    "4 channels per group": (32, 32, 3, 1, 1, 8),
    "3x3 dilated 2, grouped": (64, 64, 3, 1, 2, 2, 2),
    "3x3 dilated 4": (32, 32, 3, 1, 4, 1, 4),
}


class ConvBnLoss(nn.Cell):
    """relu(bn(conv(x)) + residual) weighted so that every gradient term matters, computed on
    blocked tensors (converted from and back to NCHW) or on the NCHW ones."""

    def __init__(self, conv: nn.Cell, bn: nn.Cell, blocked: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.blocked = conv, bn, blocked
        self.to_blocked, self.to_plain = layout_ops()

    def construct(self, x, residual):
        if self.blocked:
            y = self.to_plain(self.bn(self.conv(self.to_blocked(x)), True, self.to_blocked(residual)))
        else:
            y = self.bn(self.conv(x), True, residual)
        weights = ops.arange(y.size, dtype=ms.float32).reshape(y.shape) / y.size
        return (y * y * weights).sum()


def _gradients(net: nn.Cell, x, residual) -> list[np.ndarray]:
    net.set_train(True)
    grad = ms.value_and_grad(net, grad_position=(0, 1), weights=net.trainable_params())
    grad(x, residual)  # the second call must agree too (compiled graphs re-run)
    loss, ((dx, dresidual), dweights) = grad(x, residual)
    return [loss.asnumpy(), dx.asnumpy(), dresidual.asnumpy(), *(d.asnumpy() for d in dweights),
            net.bn.moving_mean.asnumpy(), net.bn.moving_variance.asnumpy()]


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv_and_batchnorm_match_nchw(geometry, exec_mode):
    cin, cout, kernel, stride, pad, groups, *dilation = geometry
    rng = np.random.RandomState(0)
    x = ms.Tensor((rng.randn(2, cin, 9, 7) * 2 + 1).astype(np.float32))
    results = []
    for blocked in (True, False):
        ms.set_seed(0)
        conv = Conv2d(cin, cout, kernel, stride=stride, pad_mode="pad" if pad else "valid", padding=pad, group=groups,
                      dilation=dilation[0] if dilation else 1)
        net = ConvBnLoss(conv, BatchNorm2d(cout, momentum=0.8), blocked)
        residual = ms.Tensor(rng.randn(*conv(x).shape).astype(np.float32)) if not results else results[0][1]
        results.append((_gradients(net, x, residual), residual))
    names = ["loss", "dx", "dresidual", "dweight", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, a, b in zip(names, results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=name)


class RoundTrip(nn.Cell):
    def __init__(self, weights) -> None:
        super().__init__()
        self.weights = weights
        self.to_blocked, self.to_plain = layout_ops()

    def construct(self, x):
        return (self.to_plain(self.to_blocked(x)) * self.weights).sum()


def test_layout_conversions_round_trip(exec_mode):
    to_blocked, to_plain = layout_ops()
    width = blocked_width()
    x = np.random.RandomState(1).randn(2, 2 * width, 3, 5).astype(np.float32)
    blocked = to_blocked(ms.Tensor(x)).asnumpy()
    assert blocked.shape == (2, 2, 3, 5, width)
    # channel c is lane c % width of block c // width
    np.testing.assert_array_equal(blocked, x.reshape(2, 2, width, 3, 5).transpose(0, 1, 3, 4, 2))
    np.testing.assert_array_equal(to_plain(ms.Tensor(blocked)).asnumpy(), x)
    weights = ms.Tensor(np.arange(x.size, dtype=np.float32).reshape(x.shape))
    grad = ms.grad(RoundTrip(weights))(ms.Tensor(x))
    np.testing.assert_array_equal(grad.asnumpy(), weights.asnumpy())


def test_frozen_batchnorm_and_plain_convolution_take_blocked_tensors(exec_mode):
    # a BN normalising with its running statistics and a conv off the native kernels fall back to
    # MindSpore's ops through NCHW
    to_blocked, to_plain = layout_ops()
    width = blocked_width()
    x = ms.Tensor(np.random.RandomState(2).randn(2, width, 5, 5).astype(np.float32))
    bn = BatchNorm2d(width, use_batch_statistics=False)
    bn.moving_mean.set_data(ms.Tensor(np.linspace(-1, 1, width).astype(np.float32)))
    bn.set_train(True)
    np.testing.assert_allclose(to_plain(bn(to_blocked(x), True)).asnumpy(), bn(x, True).asnumpy(), rtol=1e-6)
    conv = Conv2d(width, width, 3, pad_mode="pad", padding=1)
    expected = conv(x).asnumpy()
    conv.native = None
    np.testing.assert_allclose(to_plain(conv(to_blocked(x))).asnumpy(), expected, rtol=1e-4, atol=1e-4)


def test_drop_path_drops_whole_samples_of_blocked_tensors(pynative_mode):
    ms.set_seed(1)
    drop = DropPath(0.5)
    drop.set_train(True)
    out = drop(ms.Tensor(np.ones((16, 2, 3, 3, blocked_width()), np.float32))).asnumpy()
    per_sample = out.reshape(16, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()


class Blocks(nn.Cell):
    """Two residual blocks (the first with a strided projection shortcut) on blocked or NCHW
    activations, and the sum of their output's squares."""

    def __init__(self, block: type, blocked: bool, avg_down: bool = False, **block_args) -> None:
        super().__init__()
        width, out_width = 64 * block.expansion, 128 * block.expansion
        self.first = block(width, 128, 2, make_shortcut(width, out_width, 2, avg_down), **block_args)
        self.second = block(out_width, 128, 1, None, **block_args)
        self.blocked = blocked
        self.to_blocked, self.to_plain = layout_ops()

    def construct(self, x):
        if self.blocked:
            y = self.to_plain(self.second(self.first(self.to_blocked(x))))
        else:
            y = self.second(self.first(x))
        return (y * y).sum()


BLOCKS = {
    "basic": (BasicBlock, {}),
    "bottleneck, grouped, stochastic depth": (Bottleneck, dict(groups=32, base_width=4, drop_path=0.5)),
    "res2net": (Bottle2neck, dict(base_width=26, scale=4)),
    "res2net, average-pool shortcut, stochastic depth": (Bottle2neck, dict(base_width=14, scale=8, avg_down=True,
                                                                          drop_path=0.5)),
    "res2net, splits of whole blocks": (Bottle2neck, dict(base_width=16, scale=4, avg_down=True)),
    "resnest, average-pool shortcut": (ResNestBottleneck, dict(radix=2, avd=True, avg_down=True)),
    "resnest, splits of 20 channels": (ResNestBottleneck, dict(radix=2, avd=True, base_width=10)),
    # seed 4: with inputs 3 the two computations' rounding flips a ReLU of this random block, moving
    # some gradients by 1-3 % (at 24 px with inputs 3 they agree to 5e-5)
    "resnest, dilated": (ResNestBottleneck, dict(radix=2, avd=True, dilation=2, first_dilation=2, seed=4)),
    "res2net, dilated": (Bottle2neck, dict(base_width=16, scale=4, dilation=4, first_dilation=2)),
}


@pytest.mark.parametrize("block", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.slow
def test_residual_blocks_match_nchw(block, exec_mode):
    block_type, block_args = block
    block_args = dict(block_args)
    x = ms.Tensor(np.random.RandomState(block_args.pop("seed", 3)).randn(4, 64 * block_type.expansion, 12, 12)
                  .astype(np.float32))
    results = []
    for blocked in (True, False):
        ms.set_seed(0)  # the same weights and stochastic-depth masks
        net = Blocks(block_type, blocked, **block_args)
        assert net.first.blockable(blocked_width()) and net.second.blockable(blocked_width())
        net.set_train(True)
        # a bias before a BatchNorm (ResNeSt's fc1) has a gradient of zero, computed as rounding noise
        params = [p for p in net.trainable_params() if not p.name.endswith("fc1.bias")]
        loss, (dx, dweights) = ms.value_and_grad(net, 0, params)(x)
        results.append([loss.asnumpy(), dx.asnumpy(), *(d.asnumpy() for d in dweights)])
    for a, b in zip(*results):  # MindSpore's own convolutions differ from the native ones by up to 4e-5 here
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


class StemLoss(nn.Cell):
    """A weighted sum of the stem and max pool's output, computed blocked or in NCHW."""

    def __init__(self, net: ResNet, blocked: bool) -> None:
        super().__init__()
        self.net, self.blocked = net, blocked
        self.to_plain = layout_ops()[1]

    def construct(self, x):
        y = self.net.forward_stem(x, self.blocked)
        if self.blocked:
            y = self.to_plain(y)
        weights = ops.arange(y.size, dtype=ms.float32).reshape(y.shape) / y.size
        return (y * y * weights).sum()


@pytest.mark.parametrize("deep_stem", [False, True], ids=["7x7", "deep"])
@pytest.mark.slow
def test_stem_matches_nchw(deep_stem, exec_mode):
    x = ms.Tensor(np.random.RandomState(5).randn(2, 3, 64, 64).astype(np.float32))
    results = []
    for blocked in (True, False):
        ms.set_seed(0)
        net = ResNet(Bottleneck, (1, 1, 1, 1), deep_stem=deep_stem, stem_width=16, num_classes=10)
        net.set_train(True)
        params = [p for p in net.trainable_params() if p.name.startswith(("conv1.", "bn1."))]
        loss, (dx, dweights) = ms.value_and_grad(StemLoss(net, blocked), 0, params)(x)
        moving = [p.asnumpy() for p in net.get_parameters()
                  if "moving" in p.name and p.name.startswith(("conv1.", "bn1."))]
        results.append([loss.asnumpy(), dx.asnumpy(), *(d.asnumpy() for d in dweights), *moving])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_training_step_matches_nchw_trunk(pynative_mode):
    # 96 px: deeper random nets on tiny maps are ill-conditioned (MindSpore's own convolutions and
    # the native NCHW ones then differ by a few % in some gradients, whatever the layout). Seed 13:
    # the two computations' rounding flips no ReLU of this net (with most inputs it flips one,
    # moving some gradients by 1-10 %), with AVX-512 and under the AVX2 cap.
    _trunk_steps_agree(lambda: ResNet(Bottleneck, (2, 1, 1, 1), num_classes=10), batch=4, size=96)


def _trunk_steps_agree(build, batch: int, size: int) -> None:
    """A training step of the trunk ``build`` makes, on blocked activations and in NCHW: the same
    loss, gradients and running statistics (same weights: seeded)."""
    rng = np.random.RandomState(13)
    x = ms.Tensor(rng.randn(batch, 3, size, size).astype(np.float32))
    labels = ms.Tensor(rng.randint(0, 10, batch).astype(np.int32))
    results = []
    for blocked in (True, False):
        ms.set_seed(0)
        net = build()
        assert net.blocked
        net.blocked = blocked
        results.append(step_results(net, x, labels))
    assert_same_step(*results)


@pytest.mark.parametrize("block, block_args", [(Bottleneck, {}), (Bottle2neck, dict(base_width=26, scale=4))],
                         ids=["bottleneck", "res2net"])
@pytest.mark.slow
def test_dilated_training_step_matches_nchw_trunk(pynative_mode, block, block_args):
    """output_stride=8: dilated 3x3 convolutions (2 and 4) on the native kernels, the dilated avg-pool
    shortcut and Res2Net's stride-1 stage pool, blocked against NCHW (ResNeSt's dilated split
    attention: test_residual_blocks_match_nchw; its whole random trunk is too ill-conditioned here)."""
    _trunk_steps_agree(lambda: ResNet(block, (1, 1, 1, 1), num_classes=10, avg_down=True, output_stride=8,
                                      block_args=block_args), batch=2, size=64)


def test_feature_maps_are_nchw(pynative_mode):
    x = ms.Tensor(np.random.RandomState(4).randn(1, 3, 64, 64).astype(np.float32))
    maps = []
    for blocked in (True, False):
        ms.set_seed(0)
        net = ResNet(BasicBlock, (1, 1, 1, 1), features_only=True)
        net.blocked = blocked
        net.set_train(True)
        maps.append([m.asnumpy() for m in net(x)])
    assert [m.shape for m in maps[0]] == [(1, 64, 32, 32), (1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4),
                                          (1, 512, 2, 2)]
    for ours, reference in zip(*maps):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_used_by_the_seed_models_unless_frozen():
    for name in ("resnet50", "resnext50_32x4d", "res2net50", "res2net50_14w_8s", "res2net50_v1b", "resnest50"):
        assert models.create_model(name, num_classes=10).blocked, name
    assert not ResNet(Bottleneck, (1, 1, 1, 1), frozen_stages=1).blocked
    assert not Bottleneck(256, 64, groups=2, base_width=52).blockable(16)  # 104 channels: no whole blocks
    assert Bottle2neck(256, 64, base_width=26).blockable(16)  # 104 channels inside, whole blocks at the edges
    assert all(block.interior_blocked for block in models.create_model("resnest50", num_classes=10).layer1)
    res2net = models.create_model("res2net50", num_classes=10)  # splits of 26 / 52 / 104 / 208 channels
    assert not any(block.interior_blocked for block in res2net.layer1)
    assert all(block.interior_blocked for block in res2net.layer4)
    nchw_inside = ResNestBottleneck(256, 64, base_width=20)  # splits of 20 channels: NCHW between conv1 and conv3
    assert nchw_inside.blockable(blocked_width()) and not nchw_inside.interior_blocked


@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2", reason="already capped")
@pytest.mark.slow
def test_blocks_of_8_channels_under_avx2_cap():
    output = pytest_under_avx2_cap(__file__, "graph or round_trip")
    assert " failed" not in output and " passed" in output
