"""validate.py / eval.py: the reported accuracy equals a direct computation over the same logits."""
from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

import eval as eval_entry  # noqa: F401  (the module must import cleanly)
import models
import validate as validate_entry
from config import ConfigError, inference_job, parse_config, train_job
from resgarden.data.datasets import load_cifar10_split, load_imagenet_split, make_loader
from resgarden.inference.accuracy import accumulate
from resgarden.training.trainer import train
from tests.helpers import train_job_of, write_cifar10_binary, write_imagenet_layout


def _direct_top1(model, split, cfg) -> float:
    model.set_train(False)
    loader, _ = make_loader(split, train_job(cfg).loader, training=False)
    hits = total = 0
    for images, labels in loader.create_tuple_iterator(num_epochs=1, output_numpy=True):
        predictions = model(ms.Tensor(images)).asnumpy().argmax(axis=1)
        hits += int((predictions == labels).sum())
        total += len(labels)
    return 100.0 * hits / total


def test_accumulate_counts_top1_top5_and_loss():
    logits = np.array([[0.0, 5, 1, 2, 3, 4],   # label 1: top-1 hit
                       [9.0, 1, 0, 2, 3, 4],   # label 2: the smallest logit, outside the top 5
                       [0.0, 1, 2, 3, 4, 5]])  # label 1: 5th largest, a top-5 hit only
    labels = np.array([1, 2, 1])
    hits1, hits5, loss = accumulate(logits, labels)
    assert (hits1, hits5) == (1, 2)
    expected = sum(np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels))
    assert loss == pytest.approx(expected)


@pytest.mark.slow
def test_imagenet_folder_run_dir_and_eval_dialect(tmp_path, capsys):
    root = tmp_path / "imagenet"
    write_imagenet_layout(str(root), per_class=5, size=36)
    run = train(train_job_of(["--model=resnet18", f"--data_dir={root}", f"--ckpt_save_dir={tmp_path / 'runs'}",
                              "--image_size=32", "--crop_pct=1.0", "--batch_size=8", "--epoch_size=1",
                              "--num_parallel_workers=1"]))
    out = tmp_path / "v.json"
    assert validate_entry.main([f"--data_dir={root}", "--dataset=imagenet", f"--ckpt_path={run['run_dir']}",
                                f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"top-1 {result['top1']:.2f}%" in printed and result["count"] == 20

    cfg = parse_config(["--image_size=32", "--crop_pct=1.0", "--num_parallel_workers=1"])
    model = models.create_model("resnet18", num_classes=4, checkpoint_path=result["weights"])
    assert result["top1"] == pytest.approx(_direct_top1(model, load_imagenet_split(str(root), "val"), cfg))

    # mindspore/models dialect: the val folder itself and the ckpt_0/ folder
    assert validate_entry.main([f"--data_path={root / 'val'}", "--device_target=CPU",
                                f"--checkpoint_file_path={run['run_dir']}/ckpt_0/"], prog="eval.py") == 0
    assert f"top-1 {result['top1']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_cifar10_binary_with_a_plain_checkpoint(tmp_path):
    write_cifar10_binary(str(tmp_path / "cifar"), per_file=12)
    model = models.create_model("resnet18", num_classes=10)
    ckpt = tmp_path / "plain.ckpt"
    ms.save_checkpoint(model, str(ckpt))
    out = tmp_path / "v.json"
    assert validate_entry.main(["--model=resnet18", "--dataset=cifar10", f"--data_dir={tmp_path / 'cifar'}",
                                f"--ckpt_path={ckpt}", "--image_size=32", "--crop_pct=1.0", "--batch_size=5",
                                f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    cfg = parse_config(["--image_size=32", "--crop_pct=1.0", "--batch_size=5"])
    split = load_cifar10_split(str(tmp_path / "cifar"), train=False)
    assert result["count"] == 12
    assert result["top1"] == pytest.approx(_direct_top1(model, split, cfg))


def test_weights_source_errors(tmp_path, capsys):
    assert validate_entry.main(["--dataset=digits", f"--data_dir={tmp_path}"]) == 2
    assert "exactly one of --pretrained or --ckpt_path" in capsys.readouterr().err
    assert validate_entry.main(["--pretrained", f"--ckpt_path={tmp_path}"]) == 2
    assert validate_entry.main([f"--ckpt_path={tmp_path / 'none.ckpt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _write_v2_layout(root, classes: int = 12, per_class: int = 2, seed: int = 0) -> list[int]:
    """``root/<index>/ILSVRC2012_val_<n>.JPEG`` with the file numbers n shuffled across classes (so
    the sorted-name order the ReaL file follows is not the folder order); returns n per image in
    the split's order (classes numerically, then names)."""
    rs = np.random.RandomState(seed)
    numbers = rs.permutation(classes * per_class) + 1
    from PIL import Image

    per_image = []
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True)
        mine = sorted(numbers[c * per_class:(c + 1) * per_class])
        for n in mine:
            pixels = rs.randint(0, 256, (36, 36, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{n:08d}.JPEG", quality=90)
        per_image += [int(n) for n in mine]
    return per_image


def _logits_in_split_order(model, split, cfg) -> np.ndarray:
    model.set_train(False)
    loader, _ = make_loader(split, train_job(cfg).loader, training=False)
    return np.concatenate([model(ms.Tensor(images)).asnumpy() for images, _ in
                           loader.create_tuple_iterator(num_epochs=1, output_numpy=True)])


@pytest.mark.slow
def test_v2_folders_real_labels_and_results_table(tmp_path, capsys):
    v2 = tmp_path / "v2"
    numbers = _write_v2_layout(v2)
    split = load_imagenet_split(str(v2), "val", plain_folder_ok=True)
    assert split.classes[:3] == ["0", "1", "2"] and split.classes[-2:] == ["10", "11"]  # not "1", "10", "11"
    assert list(split.labels) == [int(p.split("/")[-2]) for p in split.paths]

    model = models.create_model("resnet18", num_classes=12)
    ckpt = tmp_path / "m.ckpt"
    ms.save_checkpoint(model, str(ckpt))
    cfg = parse_config(["--image_size=32", "--crop_pct=1.0", "--num_parallel_workers=1"])
    logits = _logits_in_split_order(model, split, cfg)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    # ReaL sets, per image in split order: its prediction (a hit), another class, or none (skipped)
    sets = [[int(top5[i, 0])] if i % 3 == 0 else [int(top5[i, 0] + 1) % 12] if i % 3 == 1 else []
            for i in range(len(split))]
    labelled = [i for i in range(len(split)) if sets[i]]
    want1 = 100.0 * sum(top5[i, 0] in sets[i] for i in labelled) / len(labelled)
    want5 = 100.0 * sum(any(p in sets[i] for p in top5[i]) for i in labelled) / len(labelled)
    in_name_order = [sets[i] for i in np.argsort(numbers)]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(in_name_order))

    table = tmp_path / "results.csv"
    args = [f"--data_dir={v2}", "--dataset=imagenet", "--model=resnet18", f"--ckpt_path={ckpt}", "--image_size=32",
            "--crop_pct=1.0", "--num_parallel_workers=1", f"--real_labels={real}", f"--results_csv={table}"]
    out = tmp_path / "v.json"
    assert validate_entry.main(args + [f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["top1"] == pytest.approx(100.0 * np.mean(top5[:, 0] == split.labels))
    assert result["real_top1"] == pytest.approx(want1) and result["real_top5"] == pytest.approx(want5)
    assert result["real_count"] == len(labelled) and result["count"] == len(split)
    assert f"ReaL top-1 {want1:.2f}%" in capsys.readouterr().out

    assert validate_entry.main(args + ["--fold_bn=False"]) == 0  # a second row
    import csv
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2
    assert rows[0]["model"] == "resnet18" and rows[0]["weights"] == str(ckpt)
    assert float(rows[0]["top1"]) == pytest.approx(result["top1"], abs=1e-3)
    assert float(rows[0]["real_top1"]) == pytest.approx(want1, abs=1e-3)
    assert rows[0]["image_size"] == "32" and rows[0]["crop_pct"] == "1.000" and rows[0]["interpolation"]
    assert int(rows[0]["param_count"]) == int(rows[1]["param_count"]) == 11_176_512 + 12 * 512 + 12


def test_real_labels_that_do_not_fit_are_one_line(tmp_path, capsys):
    v2 = tmp_path / "v2"
    _write_v2_layout(v2, classes=3, per_class=2)
    model = models.create_model("resnet18", num_classes=3)
    ckpt = tmp_path / "m.ckpt"
    ms.save_checkpoint(model, str(ckpt))
    base = [f"--data_dir={v2}", "--dataset=imagenet", "--model=resnet18", f"--ckpt_path={ckpt}", "--image_size=32"]
    for content, message in [("[[0], [1]]", "labels 2 images, the split has 6"), ("{}", "list of label lists"),
                             ("[[0], [1], [2], [3], [0], [1]]", "list of label lists"), ("[[", "not JSON")]:
        (tmp_path / "real.json").write_text(content)
        assert validate_entry.main(base + [f"--real_labels={tmp_path / 'real.json'}"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def _save_state(path, classes: int) -> str:
    net = models.create_model("resnet18", num_classes=classes)
    ms.save_checkpoint(net, str(path))
    return str(path)


@pytest.mark.slow
def test_imagenet_weights_are_scored_on_imagenet_not_the_digits(tmp_path, monkeypatch, capsys):
    """No --data_dir: a 1000-class checkpoint and the released weights were trained on ImageNet,
    looked for in the current folder; without it, one line saying what to pass."""
    weights = _save_state(tmp_path / "imagenet_weights.ckpt", 1000)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert validate_entry.main(["--model=resnet18", f"--ckpt_path={weights}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("were trained on ImageNet, and the current folder has no 'val/' or 'val_list.txt': give "
                        "--data_dir=/path/to/imagenet (or --dataset=digits to score them on the embedded digits "
                        "anyway)") and "\n" not in err
    assert validate_entry.main(["--model=resnet18", "--pretrained"]) == 2  # before any download
    assert "the released weights were trained on ImageNet" in capsys.readouterr().err
    write_imagenet_layout(str(tmp_path / "imagenet"), per_class=2, size=36, splits=("val",))
    monkeypatch.chdir(tmp_path / "imagenet")
    out = tmp_path / "v.json"
    assert validate_entry.main(["--model=resnet18", f"--ckpt_path={weights}", "--image_size=32", f"--json={out}",
                                "--num_parallel_workers=1"]) == 0
    assert json.loads(out.read_text())["count"] == 8  # ImageNet's val/ here, not the 359 digits


def test_weights_that_do_not_say_their_data_need_it_named(tmp_path, monkeypatch, capsys):
    weights = _save_state(tmp_path / "ten_classes.ckpt", 10)
    monkeypatch.chdir(tmp_path)
    assert validate_entry.main(["--model=resnet18", f"--ckpt_path={weights}"]) == 2
    assert "does not say what data it was trained on: give --data_dir" in capsys.readouterr().err


def test_the_data_a_run_trained_on_comes_from_its_classes():
    from models.checkpoint import Checkpoint
    from resgarden.data.datasets import CIFAR10_CLASSES, DIGITS_CLASSES
    from resgarden.inference.model_loading import trained_on

    job = inference_job(parse_config(["--model=resnet18"]))
    kinds = [trained_on(job, Checkpoint("run.ckpt", {"meta.classes": json.dumps(classes)}))
             for classes in (DIGITS_CLASSES, CIFAR10_CLASSES, ["n01440764", "n01443537"])]
    assert kinds == ["digits", "cifar10", "imagenet"]
    assert trained_on(job, None) is None  # a fresh model: nothing to go by


def test_a_model_pattern_takes_the_models_with_released_weights():
    from resgarden.inference.validation import models_to_score

    def job(*args):
        return inference_job(parse_config(list(args)))

    assert models_to_score(job("--model=res2net50")) == ["res2net50"]
    assert models_to_score(job("--model=res2net50*", "--pretrained")) == ["res2net50", "res2net50_v1b"]
    with pytest.raises(ConfigError, match="add --pretrained"):
        models_to_score(job("--model=res2net50*"))
    with pytest.raises(ConfigError, match=r"no model matching 'res2net50_\[24\]\*' has released weights"):
        models_to_score(job("--model=res2net50_[24]*", "--pretrained"))
