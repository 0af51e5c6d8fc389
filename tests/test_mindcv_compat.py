"""mindcv checkpoints load into our models name for name and give the same logits (PyNative mode:
the graph-mode forward of every model is tested in tests/test_models.py)."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest

import models
from models.weights import load_weights

mindcv = pytest.importorskip("mindcv")

MINDCV_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnext50_32x4d", "resnext101_32x4d", "resnext101_64x4d",
                 "res2net50", "res2net101", "res2net50_v1b", "res2net101_v1b", "resnest50", "resnest101"]


def _randomise_bn_statistics(net: ms.nn.Cell, seed: int) -> None:
    """Make BN statistics non-trivial so that a mis-mapped BN cannot go unnoticed."""
    rs = np.random.RandomState(seed)
    for p in net.get_parameters():
        if p.name.endswith(("moving_variance", "gamma")):
            p.set_data(ms.Tensor(rs.uniform(0.5, 1.5, p.shape).astype(np.float32)))
        elif p.name.endswith(("moving_mean", "beta")):
            p.set_data(ms.Tensor(rs.uniform(-0.2, 0.2, p.shape).astype(np.float32)))


@pytest.mark.parametrize("name", MINDCV_MODELS)
@pytest.mark.slow
def test_mindcv_checkpoint_loads_and_matches(tmp_path, pynative_mode, name):
    reference = mindcv.create_model(name, num_classes=1000)
    _randomise_bn_statistics(reference, seed=len(name))
    reference.set_train(False)
    path = str(tmp_path / f"{name}_mindcv.ckpt")
    ms.save_checkpoint(reference, path)

    ours = models.create_model(name)
    ours.set_train(False)
    report = load_weights(ours, path)  # strict: raises on any missing/unexpected/mismatched name
    os.remove(path)  # up to 330 MB: keep the disk free
    assert report.ok and len(report.loaded) == len(ours.parameters_dict())

    x = ms.Tensor(np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32))
    expected = reference(x).asnumpy()
    got = ours(x).asnumpy()
    assert np.abs(expected - got).max() < 1e-4 * max(1.0, np.abs(expected).max())
