"""validate.py / eval.py: the reported accuracy equals a direct computation over the same logits."""
from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

import eval as eval_entry  # noqa: F401  (the module must import cleanly)
import models
import validate as validate_entry
from config import parse_config, train_job
from resgarden.data import load_cifar10_split, load_imagenet_split, make_loader
from resgarden.accuracy import accumulate
from resgarden.trainer import train
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
