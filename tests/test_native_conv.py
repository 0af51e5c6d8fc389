"""The native oneDNN convolution against MindSpore's own: values and both gradients, every geometry
the model zoo uses, graph and PyNative; and the fallbacks."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from models.conv import Conv2d, native_conv_available, native_conv_disabled
from models.layers import ZeroPad1
from tests.helpers import pytest_under_avx2_cap

pytestmark = pytest.mark.skipif(not native_conv_available(), reason="native convolutions unavailable here")

GEOMETRIES = {  # in, out, kernel, stride, padding, dilation, groups, bias
    "3x3": (8, 16, 3, 1, 1, 1, 1, False),
    "3x3 stride 2": (8, 16, 3, 2, 1, 1, 1, False),
    "1x1 stride 2": (8, 16, 1, 2, 0, 1, 1, False),
    "7x7 stem": (3, 16, 7, 2, 3, 1, 1, False),
    "dilated": (8, 16, 3, 1, 2, 2, 1, False),
    "dilated 4, grouped (output_stride=8)": (32, 64, 3, 1, 4, 4, 2, False),
    "grouped": (16, 32, 3, 2, 1, 1, 4, False),
    "4 channels per group": (16, 16, 3, 1, 1, 1, 4, False),  # gradients in NHWC (ResNeXt 32x4d's first stage)
    "odd channels": (13, 26, 3, 1, 1, 1, 1, False),
    "32 channels": (32, 32, 3, 1, 1, 1, 1, False),
    "with bias": (8, 16, 1, 1, 0, 1, 1, True),
    "asymmetric pad": (8, 16, 3, 1, (0, 1, 1, 2), 1, 1, False),
}


class SquaredSum(nn.Cell):
    def __init__(self, conv: nn.Cell) -> None:
        super().__init__()
        self.conv = conv

    def construct(self, x):
        return (self.conv(x) ** 2).sum()


def _pair(native_cls, geometry):
    cin, cout, k, stride, pad, dilation, groups, bias = geometry
    kwargs = {"stride": stride, "pad_mode": "pad", "padding": pad, "dilation": dilation, "group": groups,
              "has_bias": bias}
    fast, reference = native_cls(cin, cout, k, **kwargs), nn.Conv2d(cin, cout, k, **kwargs)
    for name, param in reference.parameters_and_names():
        param.set_data(dict(fast.parameters_and_names())[name].value())
    return fast, reference


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.slow
def test_matches_mindspore_convolution(geometry, exec_mode):
    fast, reference = _pair(Conv2d, geometry)
    assert fast.native is not None
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(2, geometry[0], 13, 11).astype(np.float32))
    results = []
    for conv in (fast, reference):
        grad = ms.value_and_grad(SquaredSum(conv), grad_position=0, weights=conv.trainable_params())
        grad(x)  # the second call must agree too (compiled graphs re-run)
        loss, (dx, dweights) = grad(x)
        results.append((conv(x).asnumpy(), loss.asnumpy(), dx.asnumpy(), [d.asnumpy() for d in dweights]))
    (out, loss, dx, dws), (out_ref, loss_ref, dx_ref, dws_ref) = results
    assert out.shape == out_ref.shape
    np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-3)
    for dw, dw_ref in zip(dws, dws_ref):
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3 * np.abs(dw_ref).max())


@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2", reason="already capped")
@pytest.mark.slow
def test_matches_mindspore_convolution_under_avx2_cap():
    output = pytest_under_avx2_cap(__file__, "test_matches_mindspore_convolution and graph and not avx2")
    assert f"{len(GEOMETRIES)} passed" in output


def test_same_input_shape_different_geometry_in_pynative():
    # PyNative caches shape inference per primitive and input shapes: two geometries must not share it.
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        x = ms.Tensor(np.ones((1, 4, 9, 9), np.float32))
        shapes = [Conv2d(4, 4, 3, stride=s, pad_mode="pad", padding=1)(x).shape for s in (1, 2, 3)]
    finally:
        ms.set_context(mode=previous)
    assert shapes == [(1, 4, 9, 9), (1, 4, 5, 5), (1, 4, 3, 3)]


def test_fallback_to_mindspore_convolution():
    with native_conv_disabled():
        assert not native_conv_available()
        assert Conv2d(4, 4, 3, pad_mode="pad", padding=1).native is None
    assert Conv2d(4, 4, 3, pad_mode="same").native is None  # 'same' depends on the input size


def test_mixed_precision_runs_in_float32(exec_mode):
    fast, reference = _pair(Conv2d, GEOMETRIES["3x3"])
    x = ms.Tensor(np.random.RandomState(2).randn(1, 8, 6, 6).astype(np.float32))
    expected = reference(x).asnumpy()
    fast.to_float(ms.float16)
    out = fast(x)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_zero_pad_matches_nn_pad(exec_mode):
    x = ms.Tensor(np.random.RandomState(1).randn(2, 3, 5, 4).astype(np.float32))
    results = []
    for pad in (ZeroPad1(), nn.Pad(paddings=((0, 0), (0, 0), (1, 1), (1, 1)), mode="CONSTANT")):
        grad = ms.value_and_grad(SquaredSum(nn.SequentialCell([pad, nn.MaxPool2d(3, 2)])), grad_position=0)
        grad(x)
        results.append((pad(x).asnumpy(), grad(x)[1].asnumpy()))
    assert results[0][0].shape == (2, 3, 7, 6)
    for ours, reference in zip(*results):
        np.testing.assert_array_equal(ours, reference)
