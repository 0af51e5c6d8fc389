"""Backbones for dense tasks: feature maps as timm numbers them, ``feature_info``, loading full
checkpoints into truncated trunks, and ``frozen_stages`` (parameters and BN statistics fixed)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import models
from models.checkpoint import find_checkpoint
from resgarden.training.trainer import train
from tests.helpers import train_job_of, write_imagenet_layout

FAMILIES = ["resnet18", "resnext50_32x4d", "res2net50_14w_8s", "res2net50_v1b", "resnest50"]


def _input(size: int = 64, batch: int = 2, seed: int = 0) -> ms.Tensor:
    return ms.Tensor(np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.slow
def test_maps_match_feature_info(name):
    model = models.create_model(name, features_only=True)
    model.set_train(False)
    maps = model(_input())
    info = model.feature_info
    assert len(maps) == len(info) == 5
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [m.shape[1] for m in maps] == info.channels()
    assert [64 // m.shape[2] for m in maps] == info.reduction() == [64 // m.shape[3] for m in maps]
    assert info.channels()[-1] == model.num_features
    plain = models.create_model(name, num_classes=10)  # every model describes its maps
    assert plain.feature_info.channels() == info.channels()


@pytest.mark.slow
def test_out_indices_select_maps_and_truncate_the_trunk(exec_mode, tmp_path):
    full = models.create_model("resnet18")
    full.set_train(False)
    path = str(tmp_path / "full.ckpt")
    ms.save_checkpoint(full, path)
    every = models.create_model("resnet18", features_only=True, checkpoint_path=path, head="refuse")
    some = models.create_model("resnet18", features_only=True, out_indices=(1, 3), checkpoint_path=path,
                               head="refuse")
    for m in (every, some):
        m.set_train(False)
    assert some.layer4 is None and some.classifier is None
    assert not [n for n in some.parameters_dict() if n.startswith(("layer4.", "classifier."))]
    assert some.feature_info.channels() == [64, 256] and some.feature_info.reduction() == [4, 16]
    x = _input()
    all_maps, chosen = every(x), some(x)
    assert len(chosen) == 2
    np.testing.assert_array_equal(chosen[0].asnumpy(), all_maps[1].asnumpy())
    np.testing.assert_array_equal(chosen[1].asnumpy(), all_maps[3].asnumpy())
    last = full.forward_features(x).asnumpy()  # the full model's last map is map 4
    np.testing.assert_allclose(all_maps[4].asnumpy(), last, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(features_only=True, out_indices=(5,)), "out_indices"),
    (dict(features_only=True, out_indices=()), "out_indices"),
    (dict(frozen_stages=5), "frozen_stages"),
    (dict(frozen_stages=-2), "frozen_stages"),
])
def test_bad_feature_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.create_model("resnet18", **kwargs)


def _state(model: nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


FIXED_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.")


@pytest.mark.parametrize("name", ["resnet18", "res2net50_48w_2s", "resnest50"])  # one per family
@pytest.mark.slow
def test_frozen_stages_stay_fixed_while_training(name):
    model = models.create_model(name, num_classes=4, frozen_stages=2)
    fixed = [p.name for p in model.get_parameters() if not p.requires_grad
             and not p.name.endswith(("moving_mean", "moving_variance"))]
    assert fixed and all(n.startswith(FIXED_PREFIXES) for n in fixed)
    assert all(n.startswith(FIXED_PREFIXES) or p.requires_grad
               for n, p in model.parameters_and_names() if not n.endswith(("moving_mean", "moving_variance")))
    before = _state(model)
    loss = nn.WithLossCell(model, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
    step = nn.TrainOneStepCell(loss, nn.Momentum(model.trainable_params(), 0.1, 0.9, weight_decay=1e-4))
    step.set_train(True)
    rs = np.random.RandomState(1)
    for _ in range(2):
        step(_input(32, batch=4, seed=rs.randint(1000)), ms.Tensor(rs.randint(0, 4, 4).astype(np.int32)))
    after = _state(model)
    for key, value in before.items():
        if key.startswith(FIXED_PREFIXES):  # weights, BN affine and BN running statistics
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    changed = [k for k in before if k.startswith("layer3.") and not np.array_equal(after[k], before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("moving_mean") for k in changed)


def _weights(path: str) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items() if not k.startswith("meta.")}


@pytest.mark.slow
def test_train_py_frozen_stages(tmp_path, caplog):
    data = tmp_path / "data"
    write_imagenet_layout(str(data), per_class=4, size=36)
    base = ["--model=resnet18", "--image_size=32", "--batch_size=8", "--num_parallel_workers=1", "--lr=0.05",
            f"--data_dir={data}", "--epoch_size=1", "--val_while_train=False", "--weight_decay=1e-4"]
    start = train(train_job_of(base + [f"--output_path={tmp_path / 'a'}"]))
    before = _weights(find_checkpoint(start["run_dir"]))
    caplog.set_level("INFO", logger="resgarden")
    tuned = train(train_job_of(base + [f"--output_path={tmp_path / 'b'}", f"--ckpt_path={start['run_dir']}",
                                       "--frozen_stages=1"]))
    assert "frozen stages: the stem and stage 1 fixed" in caplog.text
    after = _weights(find_checkpoint(tuned["run_dir"]))
    for key in before:
        if key.startswith(("conv1.", "bn1.", "layer1.")):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert not np.array_equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])
    assert not np.array_equal(after["layer2.0.bn1.moving_mean"], before["layer2.0.bn1.moving_mean"])


@pytest.mark.parametrize("output_stride, reductions", [(16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])])
def test_output_stride_keeps_the_weights_and_reports_the_reductions(pynative_mode, output_stride, reductions):
    dense = models.create_model("resnet18", features_only=True, output_stride=output_stride)
    assert dense.feature_info.reduction() == reductions
    plain = models.create_model("resnet18")
    assert {k: tuple(v.shape) for k, v in dense.parameters_dict().items()} == \
        {k: tuple(v.shape) for k, v in plain.parameters_dict().items() if not k.startswith("classifier.")}
    dense.set_train(False)
    maps = dense(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))
    assert [m.shape[2] for m in maps] == [64 // r for r in reductions]
    with pytest.raises(ValueError, match="output_stride must be one of"):
        models.create_model("resnet18", output_stride=4)
