"""export.py (MINDIR round trip, dynamic batch, ONNX) and infer.py (top-5 names)."""
from __future__ import annotations

import csv
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import export as export_entry
import infer as infer_entry
import models
from resgarden.inference.predict import imagenet_lemmas
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


@pytest.mark.slow
def test_mindir_round_trip_matches_the_cell(tmp_path, resnet18_ckpt):
    net, ckpt = resnet18_ckpt
    out = tmp_path / "r18.mindir"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=MINDIR", "--batch_size=2",
                              "--dynamic_batch=False", "--image_size=64", f"--file_name={out}"]) == 0
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    net.set_train(False)
    np.testing.assert_allclose(_graph_cell_output(str(out), x), net(ms.Tensor(x)).asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dynamic_batch_mindir(tmp_path, resnet18_ckpt):
    net, ckpt = resnet18_ckpt
    out = tmp_path / "dyn.mindir"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--image_size=64", "--batch_size=2",
                              f"--file_name={out}", "--verify"]) == 0  # the batch is open by default
    for batch in (1, 3):
        x = np.random.RandomState(batch).randn(batch, 3, 64, 64).astype(np.float32)
        assert _graph_cell_output(str(out), x).shape == (batch, 10)


@pytest.mark.parametrize("name", ["resnet18", "res2net50", "resnest50"])  # one per family
@pytest.mark.slow
def test_onnx_batch_is_open_and_verified_per_family(tmp_path, capsys, name):
    import onnxruntime

    net = models.create_model(name, num_classes=4)
    ckpt = str(tmp_path / "m.ckpt")
    ms.save_checkpoint(net, ckpt)
    data = tmp_path / "data"
    write_imagenet_layout(str(data), per_class=1, size=40, splits=("val",))
    out = tmp_path / "m.onnx"
    assert export_entry.main([f"--model={name}", f"--ckpt_path={ckpt}", "--file_format=ONNX", "--image_size=64",
                              f"--file_name={out}", "--verify", f"--data_dir={data}", "--dataset=imagenet",
                              "--batch_size=3"]) == 0
    printed = capsys.readouterr().out
    assert "input Nx3x64x64" in printed and "on 3 and 1 val-split image(s)" in printed
    difference = float(printed.split("largest difference ")[1].split()[0])
    assert difference <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "N"
    net.set_train(False)
    for batch in (1, 5):  # any batch, outputs as the cell's
        x = np.random.RandomState(batch).randn(batch, 3, 64, 64).astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        want = net(ms.Tensor(x)).asnumpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_onnx_fixed_batch_and_a_failed_verification(tmp_path, resnet18_ckpt, capsys, monkeypatch):
    import onnxruntime

    from resgarden.inference import export_check

    _, ckpt = resnet18_ckpt
    out = tmp_path / "r18.onnx"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=ONNX", "--batch_size=1",
                              "--dynamic_batch=False", "--image_size=64", f"--file_name={out}"]) == 0
    assert onnxruntime.InferenceSession(str(out)).get_inputs()[0].shape == [1, 3, 64, 64]
    runner = export_check._runner
    monkeypatch.setattr(export_check, "_runner", lambda *a: (lambda batch: runner(*a)(batch) * 1.001))
    capsys.readouterr()
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=MINDIR", "--batch_size=2",
                              "--image_size=64", f"--file_name={tmp_path / 'bad'}", "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computes something else" in err[0], err
    air = tmp_path / "never.air"
    assert export_entry.main(["--model=resnet18", f"--ckpt_path={ckpt}", "--file_format=AIR", "--verify",
                              f"--file_name={air}"]) == 2  # refused before anything is built or written
    assert "--verify runs ONNX and MINDIR files" in capsys.readouterr().err and not air.exists()


def test_imagenet_names_are_shipped():
    lemmas = imagenet_lemmas()
    assert len(lemmas) == 1000 and list(lemmas) == sorted(lemmas)
    assert lemmas["n01440764"].startswith("tench")


@pytest.mark.slow
def test_infer_prints_top5_names_from_a_run(tmp_path, capsys):
    from resgarden.training.trainer import train

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
    assert "no such image, folder or list file" in capsys.readouterr().err

    # a folder (with an unreadable file, left out) and a list file, in batches, to CSV and JSON
    folder = root / "val"
    (folder / classes[1] / "broken.jpg").write_bytes(b"not a jpeg")
    table, listing = tmp_path / "p.csv", tmp_path / "list.txt"
    assert infer_entry.main([f"--ckpt_path={run['run_dir']}", "--images", str(folder), "--batch_size=3",
                             "--top_k=2", f"--predictions={table}"]) == 0
    printed = capsys.readouterr().out
    assert "cannot read image" in printed and "broken.jpg" in printed  # logged, left out
    assert printed.strip().endswith(f"wrote the top-2 classes of 16 images to {table}")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 16 and list(rows[0]) == ["image", "class_1", "prob_1", "class_2", "prob_2"]
    assert all("broken" not in row["image"] for row in rows)
    listing.write_text(os.path.relpath(image, tmp_path) + "\n")
    out = tmp_path / "p.json"
    assert infer_entry.main([f"--ckpt_path={run['run_dir']}", "--images", str(listing), f"--predictions={out}"]) == 0
    [alone] = json.loads(out.read_text())
    in_batch = next(row for row in rows if row["image"] == image)  # batched like alone, to float rounding
    assert alone["top"][0]["name"] == in_batch["class_1"]
    assert alone["top"][0]["prob"] == pytest.approx(float(in_batch["prob_1"]), abs=1e-5)
