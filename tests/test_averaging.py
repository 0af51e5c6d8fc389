"""average.py: the mean of a run's last / best checkpoints (EMA weights where kept, BN statistics
too) that validate.py and export.py take."""
from __future__ import annotations

import json
import os

import mindspore as ms
import numpy as np
import pytest

import average as average_entry
import export as export_entry
import validate as validate_entry
from resgarden.training.trainer import train
from tests.helpers import train_job_of, write_imagenet_layout

BASE = ["--model=resnet18", "--image_size=32", "--batch_size=8", "--num_parallel_workers=1", "--lr=0.05",
        "--crop_pct=1.0", "--epoch_size=3", "--keep_checkpoint_max=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    write_imagenet_layout(str(root), per_class=4, size=36)
    return str(root)


def _state(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v.asnumpy() for k, v in ms.load_checkpoint(path).items()
            if k.startswith(prefix) and not k.startswith("meta.")}


@pytest.mark.parametrize("ema", [False, True], ids=["weights", "ema"])
@pytest.mark.slow
def test_average_is_the_elementwise_mean_and_validates(data, tmp_path, capsys, ema):
    run = train(train_job_of(BASE + [f"--data_dir={data}", f"--output_path={tmp_path}"]
                             + (["--ema", "--ema_decay=0.5"] if ema else [])))
    folder = os.path.join(run["run_dir"], "ckpt_0")
    entries = json.load(open(os.path.join(folder, "checkpoints.json")))
    files = [os.path.join(folder, e["file"]) for e in entries[-2:]]
    capsys.readouterr()
    assert average_entry.main([f"--ckpt_path={run['run_dir']}", "--last=2"]) == 0
    out = os.path.join(folder, "resnet18-avg-last2.ckpt")
    assert f"wrote {out}" in capsys.readouterr().out
    averaged = _state(out)
    inputs = [_state(f, "ema." if ema else "") for f in files]
    weights = {k: v for k, v in inputs[0].items() if k in averaged}
    assert "layer1.0.bn1.moving_mean" in averaged and "classifier.weight" in averaged
    assert not [k for k in averaged if k.startswith(("moments", "momentum", "ema.", "global_step"))]
    assert len(weights) == len(averaged)
    for name in weights:
        want = ((inputs[0][name].astype(np.float64) + inputs[1][name]) / 2).astype(np.float32)
        np.testing.assert_array_equal(averaged[name], want, err_msg=name)
    if ema:  # the EMA, not the raw weights
        raw = _state(files[0])
        assert not np.array_equal(averaged["layer1.0.conv1.weight"],
                                  ((raw["layer1.0.conv1.weight"] + _state(files[1])["layer1.0.conv1.weight"]) / 2))

    report = tmp_path / "v.json"
    assert validate_entry.main([f"--data_dir={data}", "--dataset=imagenet", f"--ckpt_path={out}",
                                f"--json={report}"]) == 0  # model, classes and transform from the metadata
    result = json.loads(report.read_text())
    assert result["model"] == "resnet18" and result["count"] == 16
    if not ema:
        assert export_entry.main([f"--ckpt_path={out}", "--file_format=MINDIR",
                                  f"--file_name={tmp_path / 'avg.mindir'}"]) == 0
        assert average_entry.main([f"--ckpt_path={folder}", "--best=2", f"--file_name={tmp_path / 'b.ckpt'}"]) == 0
        metrics = sorted(entries, key=lambda e: (-e["metric"], -e["epoch"]))[:2]  # ties: the newer
        best = [_state(os.path.join(folder, e["file"])) for e in metrics]
        got = _state(str(tmp_path / "b.ckpt"))
        np.testing.assert_array_equal(got["classifier.bias"], ((best[0]["classifier.bias"].astype(np.float64)
                                                               + best[1]["classifier.bias"]) / 2).astype(np.float32))


def test_average_asks_are_one_line(tmp_path, capsys):
    folder = tmp_path / "run" / "ckpt_0"  # choosing reads the manifest only
    folder.mkdir(parents=True)
    (folder / "checkpoints.json").write_text(json.dumps([
        dict(file="m-e001.ckpt", epoch=0, global_step=2, metric=50.0),
        dict(file="m-e002-step000001.ckpt", epoch=0, global_step=3, metric=None, step_in_epoch=1)]))
    for args, message in [(["--last=2"], "the run lists 1 epoch checkpoints"),
                          (["--best=2"], "the run lists 1 epoch checkpoints"),
                          (["--last=1", "--best=1"], "give one of --last K"),
                          ([], "give one of --last K")]:
        assert average_entry.main([f"--ckpt_path={tmp_path / 'run'}"] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert average_entry.main([f"--ckpt_path={tmp_path}", "--last=1"]) == 2
    assert "not a run folder of train.py" in capsys.readouterr().err
