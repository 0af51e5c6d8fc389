"""The house's rules: specs built once from the settings, one way weights enter a model, atomic
writes, and every module placed in a layer of the import contract."""
from __future__ import annotations

import dataclasses
import logging
import os
import tomllib

import mindspore as ms
import numpy as np
import pytest

import models
from config import inference_job, parse_config, train_job
from models.weights import WeightsError, load_weights
from resgarden.base.atomic import atomic_path, write_text
from resgarden.base.specs import EvalTransform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resnet18_state(classes: int) -> dict[str, np.ndarray]:
    net = models.create_model("resnet18", num_classes=classes)
    return {name: p.asnumpy() for name, p in net.parameters_dict().items()}


def test_specs_are_frozen_and_carry_only_what_the_engine_reads():
    job = train_job(parse_config(["--model=res2net50", "--image_size=160", "--crop_pct=0.95", "--lr=0.3",
                                  "--gradient_accumulation_steps=1", "--clip_grad", "--epoch_size=7"]))
    assert job.loader.eval_transform == EvalTransform(image_size=160, crop_pct=0.95)
    assert job.loader.eval_transform.resize == 168
    assert (job.schedule.lr, job.schedule.epochs, job.run.epochs) == (0.3, 7, 7)
    assert job.step.accumulation == 1 and job.step.clip_norm == 15.0
    assert "model: res2net50" in job.run.config_yaml
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.model.name = "resnet50"
    given = inference_job(parse_config(["--model=resnet50", "--crop_pct=1.0", "--batch_size=4"])).given
    assert given == {"model", "crop_pct"}  # what the user set wins over the weights' transform


def test_a_1001_class_checkpoint_loads_into_a_1000_class_model(tmp_path, caplog):
    state = _resnet18_state(1001)
    path = str(tmp_path / "mindspore_models_resnet18.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], path)
    with caplog.at_level(logging.INFO, logger="resgarden"):
        net = models.create_model("resnet18", num_classes=1000, checkpoint_path=path, head="refuse")
    np.testing.assert_array_equal(net.classifier.weight.asnumpy(), state["classifier.weight"][:1000])
    np.testing.assert_array_equal(net.classifier.bias.asnumpy(), state["classifier.bias"][:1000])
    assert "1001 outputs" in caplog.text
    assert net.pretrained_cfg.source == path


def test_head_policy_refuse_or_replace(caplog):
    state = _resnet18_state(10)
    net = models.create_model("resnet18", num_classes=1000)
    with pytest.raises(WeightsError, match=r"classifier.weight: checkpoint \[10, 512\] vs model \[1000, 512\]"):
        load_weights(net, state, head="refuse")
    fresh = net.classifier.weight.asnumpy().copy()
    report = load_weights(net, state, head="replace")
    assert report.ok and "classifier replaced by a fresh one" in report.table()
    np.testing.assert_array_equal(net.classifier.weight.asnumpy(), fresh)
    np.testing.assert_array_equal(net.layer4[1].conv2.weight.asnumpy(), state["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="head='keep'"):
        load_weights(net, state, head="keep")


def test_renames_are_counted_on_the_create_model_path(tmp_path, caplog):
    state = _resnet18_state(1000)
    state = {("fc." + k[len("classifier."):]) if k.startswith("classifier.") else k: v for k, v in state.items()}
    path = str(tmp_path / "mindcv_layout.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], path)
    with caplog.at_level(logging.INFO, logger="resgarden"):
        models.create_model("resnet18", checkpoint_path=path)
    assert "(2 renamed from mindcv layout)" in caplog.text


def test_a_checkpoint_saved_from_a_training_wrapper_loads(tmp_path, caplog):
    """mindspore/models checkpoints saved from a WithLossCell / TrainOneStepCell subclass carry
    "network." before every name (their loaders strip it), beside the optimizer's state."""
    state = _resnet18_state(1000)
    entries = [{"name": "network." + k, "data": ms.Tensor(v)} for k, v in state.items()]
    entries += [{"name": "moments.network.conv1.weight", "data": ms.Tensor(state["conv1.weight"])},
                {"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))}]
    path = str(tmp_path / "wrapped.ckpt")
    ms.save_checkpoint(entries, path)
    with caplog.at_level(logging.INFO, logger="resgarden"):
        net = models.create_model("resnet18", checkpoint_path=path)
    np.testing.assert_array_equal(net.layer4[1].conv2.weight.asnumpy(), state["layer4.1.conv2.weight"])
    assert f"loaded {len(state)} parameters" in caplog.text
    assert "saved from a training wrapper: the 'network.' prefix of every name stripped" in caplog.text


@pytest.mark.slow
def test_the_weights_eval_transform_travels_with_the_model():
    assert models.create_model("resnest101", num_classes=0).pretrained_cfg.eval_transform == EvalTransform(
        image_size=256, crop_pct=0.9)
    net = models.create_model("resnet18", num_classes=0)
    assert net.pretrained_cfg.source is None and net.pretrained_cfg.eval_transform == EvalTransform()
    chosen = EvalTransform(image_size=256, crop_pct=0.9).overridden_by(EvalTransform(crop_pct=1.0), ["crop_pct"])
    assert chosen == EvalTransform(image_size=256, crop_pct=1.0)


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.json"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("disk full")
    assert not target.exists() and os.listdir(tmp_path / "sub") == []
    write_text(str(target), "{}")
    assert target.read_text() == "{}" and os.listdir(tmp_path / "sub") == ["file.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: a resnet18 checkpoint (45 MB) does not fit (skipped where mounting is not allowed)."""
    import shutil
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_leaves_no_file_of_a_checkpoint_behind(small_disk):
    """MindSpore's save_checkpoint writes <name>.tmp before its own rename: that goes too."""
    from models.checkpoint import save_atomic
    from resgarden.base.errors import WriteError

    with pytest.raises(WriteError, match="No space left on device"):
        save_atomic(models.create_model("resnet18"), str(small_disk / "resnet18-best.ckpt"), {"epoch": 0})
    assert os.listdir(small_disk) == []


def test_leftovers_of_a_killed_save_are_cleaned_up(tmp_path):
    from resgarden.base.atomic import remove_stale

    for name in (".resnet18-best.ckpt.k2j4x9_a.tmp", ".resnet18-e003.ckpt.abcdefgh.ckpt", "resnet18-e002.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(remove_stale(str(tmp_path))) == [".resnet18-best.ckpt.k2j4x9_a.tmp", ".resnet18-e003.ckpt.abcdefgh.ckpt"]
    assert os.listdir(tmp_path) == ["resnet18-e002.ckpt"]


def _layered_modules() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        contracts = tomllib.load(handle)["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}


def test_every_module_has_a_layer_in_the_import_contract():
    listed = _layered_modules()
    assert "models" in listed
    for folder in ("resgarden",):
        for entry in os.listdir(os.path.join(ROOT, folder)):
            stem = entry[:-3] if entry.endswith(".py") else entry
            if entry == "__init__.py" or entry.startswith((".", "__")) or not (
                    entry.endswith(".py") or os.path.isdir(os.path.join(ROOT, folder, entry))):
                continue
            assert f"{folder}.{stem}" in listed, f"{folder}/{entry} is in no layer of pyproject.toml's contract"


@pytest.mark.parametrize("channels", [1, 6])
def test_rgb_weights_load_into_other_input_channels(channels, caplog):
    """As timm's adapt_input_conv: an image whose channels all hold the same plane gives the RGB model's
    logits (1 channel: the RGB kernels summed; N: repeated and scaled by 3/N, exact for multiples of 3)."""
    rgb = models.create_model("resnet18", num_classes=5)
    state = {k: v.asnumpy() for k, v in rgb.parameters_dict().items()}
    other = models.create_model("resnet18", num_classes=5, in_channels=channels)
    report = load_weights(other, state)
    assert any("adapted from 3 to" in note for note in report.notes)
    plane = np.random.RandomState(0).rand(2, 1, 32, 32).astype(np.float32)
    rgb.set_train(False)
    other.set_train(False)
    want = rgb(ms.Tensor(np.repeat(plane, 3, axis=1))).asnumpy()
    got = other(ms.Tensor(np.repeat(plane, channels, axis=1))).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_four_channel_input_conv_is_timms_adaptation():
    rgb = np.random.RandomState(1).randn(64, 3, 7, 7).astype(np.float32)
    model = models.create_model("resnet18", num_classes=5, in_channels=4)
    state = {k: v.asnumpy() for k, v in model.parameters_dict().items()}
    state["conv1.weight"] = rgb
    load_weights(model, state)
    want = np.concatenate([rgb, rgb[:, :1]], axis=1) * 0.75  # timm: repeat(1, 2, 1, 1)[:, :4] * 3 / 4
    np.testing.assert_allclose(model.conv1.weight.asnumpy(), want, rtol=1e-6)
