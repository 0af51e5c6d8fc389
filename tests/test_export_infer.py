"""export.py (MINDIR round trip, dynamic batch, ONNX) and infer.py (top-5 names)."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import export as export_entry
import infer as infer_entry
import models
from resgarden.predict import imagenet_lemmas
from tests.helpers import train_job_of, write_imagenet_layout


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    net = models.create_model("resnet18", num_classes=10)
    path = str(folder / "resnet18.ckpt")
    ms.save_checkpoint(net, path)
    return net, path


def _graph_cell_output(path: str, x: np.ndarray) -> np.ndarray:
    return nn.GraphCell(ms.load(path))(ms.Tensor(x)).asnumpy()


def test_mindir_round_trip_matches_the_cell(tmp_path, resnet18_ckpt):
    net, ckpt = resnet18_ckpt
    out = tmp_path / "r18.mindir"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=MINDIR", "--batch_size=2",
                              "--image_size=64", f"--file_name={out}"]) == 0
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    net.set_train(False)
    np.testing.assert_allclose(_graph_cell_output(str(out), x), net(ms.Tensor(x)).asnumpy(), rtol=1e-4, atol=1e-4)


def test_dynamic_batch_mindir(tmp_path, resnet18_ckpt):
    net, ckpt = resnet18_ckpt
    out = tmp_path / "dyn.mindir"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--dynamic_batch", "--image_size=64",
                              f"--file_name={out}"]) == 0
    for batch in (1, 3):
        x = np.random.RandomState(batch).randn(batch, 3, 64, 64).astype(np.float32)
        assert _graph_cell_output(str(out), x).shape == (batch, 10)


def test_onnx_export_writes_a_model(tmp_path, resnet18_ckpt):
    _, ckpt = resnet18_ckpt
    out = tmp_path / "r18.onnx"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=ONNX", "--batch_size=1",
                              "--image_size=64", f"--file_name={out}"]) == 0
    assert out.stat().st_size > 40_000_000  # 11.2 M float32 weights
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=ONNX",
                              "--dynamic_batch"]) == 2


def test_imagenet_names_are_shipped():
    lemmas = imagenet_lemmas()
    assert len(lemmas) == 1000 and list(lemmas) == sorted(lemmas)
    assert lemmas["n01440764"].startswith("tench")


def test_infer_prints_top5_names_from_a_run(tmp_path, capsys):
    from resgarden.trainer import train

    root = tmp_path / "data"
    classes = write_imagenet_layout(str(root), per_class=4, size=36)
    run = train(train_job_of(["--model=resnet18", f"--data_dir={root}", f"--ckpt_save_dir={tmp_path}",
                              "--image_size=32", "--crop_pct=1.0", "--batch_size=8", "--epoch_size=1",
                              "--num_parallel_workers=1"]))
    image = os.path.join(root, "val", classes[0], f"{classes[0]}_0.JPEG")
    capsys.readouterr()
    assert infer_entry.main([f"--ckpt_path={run['run_dir']}", "--images", image]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == image and len(lines) == 5  # 4 classes: top-4 shown
    shown = {line.split("%", 1)[1].strip() for line in lines[1:]}
    assert shown == {imagenet_lemmas()[c] for c in classes}
    assert sum(float(line.split("%")[0]) for line in lines[1:]) == pytest.approx(100, abs=0.1)
    assert infer_entry.main([f"--ckpt_path={run['run_dir']}", "--images", str(tmp_path / "none.jpg")]) == 2
    assert "cannot read image" in capsys.readouterr().err
