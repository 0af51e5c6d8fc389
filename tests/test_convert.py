"""PyTorch (timm / torchvision layout) weights import."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file

import models
from models.convert import ConversionError, convert, read_torch_weights, torch_to_ours

HERE = os.path.dirname(os.path.abspath(__file__))
OURS_TO_TORCH = ((".gamma", ".weight"), (".beta", ".bias"), (".moving_mean", ".running_mean"),
                 (".moving_variance", ".running_var"), (".down_sample.", ".downsample."))


def _as_torch_layout(model) -> dict[str, np.ndarray]:
    """Our parameters under timm's names, plus the BN counters PyTorch adds."""
    state = {}
    for name, param in model.parameters_dict().items():
        torch_name = "fc." + name[len("classifier."):] if name.startswith("classifier.") else name
        for ours, theirs in OURS_TO_TORCH:
            torch_name = torch_name.replace(ours, theirs)
        state[torch_name] = param.asnumpy()
        if torch_name.endswith(".running_var"):
            state[torch_name.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return state


@pytest.mark.parametrize("name", ["resnet18", "res2net50_14w_8s", "res2net50_v1b", "resnest50"])
@pytest.mark.slow
def test_timm_layout_round_trips(tmp_path, name):
    source = models.create_model(name, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file(_as_torch_layout(source), str(path))
    out = tmp_path / "w.ckpt"
    convert(name, str(path), str(out))
    loaded = models.create_model(name, num_classes=5, checkpoint_path=str(out))  # padding from the file
    assert dict(loaded.pretrained_cfg.build) == {"pool_pad": "pad"}
    for key, param in source.parameters_dict().items():
        np.testing.assert_array_equal(loaded.parameters_dict()[key].asnumpy(), param.asnumpy())


def test_converted_weights_keep_their_build_settings(tmp_path):
    """A plain ResNet defaults to MindSpore-style pools; converted timm weights must still be built
    with PyTorch's, by whoever loads them (create_model, validate, fine-tuning)."""
    source = models.create_model("resnet18", num_classes=5, pool_pad="pad")
    path = tmp_path / "w.safetensors"
    save_file(_as_torch_layout(source), str(path))
    convert("resnet18", str(path), str(tmp_path / "w.ckpt"))
    loaded = models.create_model("resnet18", num_classes=5, checkpoint_path=str(tmp_path / "w.ckpt"))
    assert dict(loaded.pretrained_cfg.build) == {"pool_pad": "pad"}
    checkpoint = models.checkpoint.open_checkpoint(str(tmp_path / "w.ckpt"))
    assert checkpoint.model_name() == "resnet18" and checkpoint.meta["converted_from"] == "w.safetensors"
    images = ms.Tensor(np.random.RandomState(0).randn(2, 3, 33, 33).astype(np.float32))  # odd size: padding shows
    source.set_train(False)
    loaded.set_train(False)
    np.testing.assert_allclose(loaded(images).asnumpy(), source(images).asnumpy(), rtol=1e-5, atol=1e-5)


def test_unmatched_tensors_and_formats_fail_clearly(tmp_path):
    with pytest.raises(ConversionError, match="match no parameter.*extra.weight"):
        torch_to_ours({"extra.weight": np.zeros(3)}, {"conv1.weight"})
    (tmp_path / "x.pkl").write_bytes(b"x")
    with pytest.raises(ConversionError, match="unsupported weights format"):
        read_torch_weights(str(tmp_path / "x.pkl"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConversionError, match="cannot read"):
        read_torch_weights(str(bad))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from models.convert import main

    assert main(["--model=resnet5", f"--src={tmp_path / 'x.safetensors'}", f"--out={tmp_path / 'o.ckpt'}"]) == 2
    assert capsys.readouterr().err.startswith("convert: error: unknown model 'resnet5'")
    assert main(["--model=resnet18", f"--src={tmp_path / 'x.safetensors'}", f"--out={tmp_path / 'o.ckpt'}"]) == 2
    assert "weights file not found" in capsys.readouterr().err


def _hub_cache(root, repo: str, files: dict[str, bytes]) -> None:
    """Hugging Face's cache layout: models--<org>--<name>/refs/main -> snapshots/<revision>/<file>."""
    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.mark.slow
def test_timm_weights_by_name_from_the_hugging_face_cache(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    import config

    hub, cache = tmp_path / "hub", tmp_path / "weights"
    source = models.create_model("resnet18", pool_pad="pad")
    weights = tmp_path / "model.safetensors"
    save_file(_as_torch_layout(source), str(weights))
    _hub_cache(hub, "timm/resnet18.a1_in1k", {"model.safetensors": weights.read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("RESGARDEN_CACHE", str(cache))
    assert config.parse_config(["--pretrained=timm:resnet18.a1_in1k"]).pretrained == "timm:resnet18.a1_in1k"

    model = models.create_model("resnet18", pretrained="timm:resnet18.a1_in1k")
    assert model.pretrained_cfg.source == "timm:resnet18.a1_in1k" and dict(model.pretrained_cfg.build) == {"pool_pad": "pad"}
    for key, param in source.parameters_dict().items():
        np.testing.assert_array_equal(model.parameters_dict()[key].asnumpy(), param.asnumpy())
    [converted] = os.listdir(cache / "timm")  # converted once, named by the source's hash
    assert converted.startswith("resnet18-resnet18.a1_in1k-") and converted.endswith(".ckpt")
    stamp = os.path.getmtime(cache / "timm" / converted)
    models.create_model("resnet18", num_classes=7, pretrained="timm:resnet18.a1_in1k")  # fine-tuning: a new head
    assert os.listdir(cache / "timm") == [converted] and os.path.getmtime(cache / "timm" / converted) == stamp

    with pytest.raises(models.weights.WeightsError, match="weights of timm's resnet34; resnet18 is timm's resnet18"):
        models.create_model("resnet18", pretrained="timm:resnet34.a1_in1k")
    with pytest.raises(models.weights.WeightsError, match=r"timm/resnet18.tv_in1k are not in the Hugging Face cache"):
        models.create_model("resnet18", pretrained="timm:resnet18.tv_in1k")  # offline, not cached
    model = models.create_model("resnet18", pretrained=f"timm:{weights}")  # a file
    np.testing.assert_array_equal(model.conv1.weight.asnumpy(), source.conv1.weight.asnumpy())


CHECK_AGAINST_TIMM = """
import sys
sys.path.append(sys.argv[1])  # torch + timm of the torch environment, behind this one's packages
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
import models
from models import torch_weights
if sys.argv[2] == "swapped":  # a converter that mixes up two tensors of the same shape
    rename = torch_weights.torch_to_ours
    def swapping(state, names):
        out = rename(state, names)
        out["layer1.0.conv1.weight"], out["layer1.0.conv2.weight"] = out["layer1.0.conv2.weight"], out["layer1.0.conv1.weight"]
        return out
    torch_weights.torch_to_ours = swapping
try:
    models.create_model("resnet18", pretrained="timm:resnet18.a1_in1k")
except models.weights.WeightsError as exc:
    print("refused:", exc)
"""


@pytest.mark.slow
def test_timm_weights_are_checked_against_timm_where_it_is_installed(tmp_path):
    """With torch and timm importable, a conversion must give timm's own logits for the same weights
    (on a fixed input) before it is cached; one that does not is refused and leaves nothing."""
    import subprocess
    import sys

    from tests.test_timm_parity import torch_python

    python = torch_python()
    if python is None:
        pytest.skip("no torch + timm (.venv-torch)")
    site = subprocess.run([python, "-c", "import timm, os; print(os.path.dirname(os.path.dirname(timm.__file__)))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    hub, cache = tmp_path / "hub", tmp_path / "weights"
    source = models.create_model("resnet18", pool_pad="pad")
    weights = tmp_path / "model.safetensors"
    save_file(_as_torch_layout(source), str(weights))
    _hub_cache(hub, "timm/resnet18.a1_in1k", {"model.safetensors": weights.read_bytes()})
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", RESGARDEN_CACHE=str(cache))
    root = os.path.dirname(HERE)

    def convert_with(converter: str) -> str:
        done = subprocess.run([sys.executable, "-c", CHECK_AGAINST_TIMM, site, converter], capture_output=True,
                              text=True, env=env, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    swapped = convert_with("swapped")
    assert "refused: the converted weights do not give timm's resnet18 logits" in swapped, swapped[-3000:]
    assert not os.listdir(cache / "timm")  # nothing cached
    checked = convert_with("as is")
    assert "checked against timm's resnet18: logits equal within" in checked, checked[-3000:]
    assert len(os.listdir(cache / "timm")) == 1
