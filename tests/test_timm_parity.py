"""PyTorch import proven against timm itself: random timm weights converted to ours give timm's
logits, and our feature maps equal timm's ``features_only`` maps, for every variant of ours that
timm publishes. timm runs in its own environment (requirements-torch.txt, ``.venv-torch``; or
``$RESGARDEN_TORCH_PYTHON``); CI installs it, so there these tests run, never skip."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import mindspore as ms
import numpy as np
import pytest

import models
from models.convert import convert

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-torch", "bin", "python")
TOLERANCE = 1e-4  # of the logit (or feature) scale


def torch_python() -> str | None:
    """A Python with torch + timm: ``$RESGARDEN_TORCH_PYTHON``, else the repository's .venv-torch."""
    python = os.environ.get("RESGARDEN_TORCH_PYTHON") or VENV_PYTHON
    return python if shutil.which(python) else None


@pytest.fixture(scope="module")
def timm_server(tmp_path_factory):
    """One torch process answering a folder of timm's weights, logits and maps per variant asked."""
    python = torch_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the timm-parity tests: install .venv-torch as README says")
        pytest.skip("no torch + timm: python3 -m venv .venv-torch && .venv-torch/bin/pip install -r "
                    "requirements-torch.txt (or set RESGARDEN_TORCH_PYTHON)")
    out = tmp_path_factory.mktemp("timm")
    errors = open(out / "stderr.txt", "w")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen([python, os.path.join(HERE, "timm_reference.py"), str(out), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)

    def reference(timm_name: str) -> pathlib.Path:
        server.stdin.write(timm_name + "\n")
        server.stdin.flush()
        answer = server.stdout.readline().strip()
        assert answer, f"timm_reference.py ended: {(out / 'stderr.txt').read_text()[-3000:]}"
        return pathlib.Path(answer)

    yield reference
    server.stdin.close()
    server.wait(timeout=60)
    errors.close()


def _close(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.slow
def test_converted_timm_weights_give_timm_logits_and_maps(timm_server, tmp_path, pynative_mode, name):
    _same_as_timm(timm_server, tmp_path, name)


# one model per block construct (the avg-pool shortcut, Res2Net's stage pool, split attention); 8
# dilates the last two stages (dilations 2 and 4, the first block of each at the previous one's)
@pytest.mark.parametrize("name, output_stride", [("resnet18", 8), ("resnet50d", 16), ("resnet50d", 8),
                                                 ("resnext50_32x4d", 8), ("res2net50", 8), ("res2net50_v1b", 16),
                                                 ("resnest50", 8)])
@pytest.mark.slow
def test_dilated_trunks_give_timms_output_stride(timm_server, tmp_path, pynative_mode, name, output_stride):
    _same_as_timm(timm_server, tmp_path, name, output_stride)


def _same_as_timm(timm_server, tmp_path, name: str, output_stride: int = 32) -> None:
    """Random timm weights converted to ours give timm's logits and feature maps."""
    folder = timm_server(models.model_card(name).timm + (f"@{output_stride}" if output_stride != 32 else ""))
    ckpt = str(tmp_path / "w.ckpt")
    convert(name, str(folder / "weights.safetensors"), ckpt)
    os.remove(folder / "weights.safetensors")  # the largest are a few hundred MB: keep the disk free
    images = ms.Tensor(np.load(folder / "images.npy"))
    model = models.create_model(name, pool_pad="pad", checkpoint_path=ckpt, output_stride=output_stride)
    model.set_train(False)
    assert _close(model(images).asnumpy(), np.load(folder / "logits.npy")) < TOLERANCE
    theirs = np.load(folder / "features.npz")
    theirs = [theirs[f"arr_{i}"] for i in range(len(theirs.files))]
    ours = model.forward_maps(images)  # what features_only returns (tests/test_features.py)
    assert [m.shape for m in ours] == [m.shape for m in theirs]
    for got, want in zip(ours, theirs):
        assert _close(got.asnumpy(), want) < TOLERANCE
    os.remove(ckpt)
