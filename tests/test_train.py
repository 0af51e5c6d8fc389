"""train.py end to end on a tiny ImageNet-layout set: learning, run layout, atomic and exact resume."""
from __future__ import annotations

import json
import os

import mindspore as ms
import numpy as np
import pytest

import train as train_entry
from models import checkpoint
from models.checkpoint import find_checkpoint, read_meta
from resgarden.training.trainer import train
from tests.helpers import read_board, train_job_of, write_imagenet_layout

BASE = ["--model=resnet18", "--image_size=32", "--batch_size=8", "--num_parallel_workers=1", "--lr=0.01",
        "--warmup_epochs=0", "--weight_decay=0", "--log_interval=1", "--scale", "0.6", "1.0", "--crop_pct=1.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_imagenet_layout(str(root), per_class=8, size=36)
    return str(root)


def _weights(path: str) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items() if not k.startswith("meta.")}


@pytest.mark.slow
def test_learns_and_writes_the_run_layout(tiny, tmp_path):
    out = tmp_path / "out"
    result = train(train_job_of(BASE + [f"--data_path={tiny}", f"--output_path={out}", "--epoch_size=5",
                                        "--keep_checkpoint_max=2"]))
    run_dir = result["run_dir"]
    assert os.path.dirname(run_dir) == str(out) and "_time_" in os.path.basename(run_dir)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
    assert records[-1]["val_top1"] > 50.0  # 4 colour classes: chance is 25 %
    ckpt_dir = os.path.join(run_dir, "ckpt_0")
    assert sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")) == \
        ["resnet18-best.ckpt", "resnet18-e004.ckpt", "resnet18-e005.ckpt"]
    assert os.path.isfile(os.path.join(run_dir, "config.yaml")) and os.path.isfile(os.path.join(run_dir, "train.log"))
    with open(os.path.join(run_dir, "curves.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = read_meta(ms.load_checkpoint(find_checkpoint(run_dir)))
    assert meta["epoch"] == 4 and meta["global_step"] == 5 * 4 and meta["classes"][0] == "n01440764"
    assert not [f for f in os.listdir(ckpt_dir) if f.startswith(".tmp")]
    scalars, texts = read_board(os.path.join(run_dir, "tensorboard"))  # every log point, every epoch
    assert sorted(scalars["train/loss"]) == list(range(1, 21))
    assert {"train/lr", "train/img_per_s", "train/loss_scale", "train/skipped_steps"} <= set(scalars)
    assert sorted(scalars["val/top1"]) == [4, 8, 12, 16, 20]
    assert scalars["val/top1"][20] == pytest.approx(records[-1]["val_top1"])
    assert scalars["train/epoch_loss"][4] == pytest.approx(records[0]["train_loss"])
    assert "model: resnet18" in texts["config/text_summary"]


EXTRAS = ["--ema", "--ema_decay=0.9", "--gradient_accumulation_steps=2", "--clip_grad", "--clip_value=5",
          "--loss_scale_type=dynamic", "--loss_scale=256", "--label_smoothing=0.1", "--opt=lamb", "--lr=0.01",
          "--mixup=0.4", "--cutmix=1.0", "--mixup_off_epoch=2", "--auto_augment=randaug-m9-mstd0.5", "--re_prob=0.25",
          "--bce_loss", "--bce_target_thresh=0.2", "--aug_repeats=3"]


@pytest.mark.parametrize("extra", [[], EXTRAS], ids=["plain", "ema-accumulation-clip-scale-mixup-randaug-bce-repeats"])
@pytest.mark.slow
def test_resume_is_exact(tiny, tmp_path, extra):
    args = BASE + extra + [f"--data_dir={tiny}", f"--ckpt_save_dir={tmp_path}", "--epoch_size=3",
                           "--keep_checkpoint_max=3", "--val_while_train=False"]
    full = train(train_job_of(args))
    ckpt_dir = os.path.join(full["run_dir"], "ckpt_0")
    uninterrupted = _weights(os.path.join(ckpt_dir, "resnet18-e003.ckpt"))
    # as if the run had stopped after epoch 2: forget epoch 3 and resume from the run folder
    os.remove(os.path.join(ckpt_dir, "resnet18-e003.ckpt"))
    manifest = os.path.join(ckpt_dir, checkpoint.MANIFEST)
    entries = [e for e in json.load(open(manifest)) if e["epoch"] < 2]
    json.dump(entries, open(manifest, "w"))
    resumed = train(train_job_of(args + [f"--resume={full['run_dir']}"]))
    assert resumed["run_dir"] == full["run_dir"] and resumed["global_step"] == full["global_step"]
    again = _weights(os.path.join(ckpt_dir, "resnet18-e003.ckpt"))
    assert set(again) == set(uninterrupted)
    worst = max(float(np.abs(again[k] - uninterrupted[k]).max()) for k in again)
    assert worst < 1e-5, f"resumed weights differ by {worst}"
    assert ("lamb_m.conv1.weight" if extra else "moments.conv1.weight") in again
    assert int(again["global_step"]) == (6 if extra else 12)  # optimizer steps: accumulation halves them
    if extra:
        assert "ema.conv1.weight" in again and float(again["ema_updates"]) == 6
    else:  # the curves continue from the resume step: each step once, the resumed run's values from step 9
        board = os.path.join(full["run_dir"], "tensorboard")
        assert len(os.listdir(board)) == 2
        scalars, _ = read_board(board)
        assert sorted(scalars["train/loss"]) == list(range(1, 13))
        resumed_only, _ = read_board(board, last_file_only=True)
        assert sorted(resumed_only["train/loss"]) == list(range(9, 13))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    net = ms.nn.Dense(3, 2)
    target = tmp_path / "x.ckpt"
    checkpoint.save_atomic(net, str(target), dict(epoch=0))
    before = target.read_bytes()

    def crash(cell, path, append_dict=None, choice_func=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.ms, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(net, str(target), dict(epoch=1))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["x.ckpt"]


@pytest.mark.slow
def test_finetune_from_a_run_replaces_the_head(tiny, tmp_path, caplog):
    first = train(train_job_of(BASE + [f"--data_dir={tiny}", f"--ckpt_save_dir={tmp_path}", "--epoch_size=1"]))
    with caplog.at_level("INFO", logger="resgarden"):
        second = train(train_job_of(BASE + [f"--data_dir={tiny}", f"--ckpt_save_dir={tmp_path}", "--epoch_size=1",
                                            "--num_classes=6", f"--ckpt_path={first['run_dir']}"]))
    assert "classifier replaced by a fresh one" in caplog.text
    head = ms.load_checkpoint(find_checkpoint(second["run_dir"]))["classifier.weight"]
    assert head.shape == (6, 512)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert train_entry.main([f"--data_path={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: error: data directory not found: {tmp_path / 'missing'}"]
    assert train_entry.main(["--modle=resnet18"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert train_entry.main(["--model=resnet5", "--dataset=digits", f"--data_dir={tmp_path / 'd'}"]) == 2
    assert "unknown model 'resnet5'" in capsys.readouterr().err


@pytest.mark.parametrize("policy, kept", [("latest_k", [3, 4]), ("top_k", [1, 3, 4])])  # top_k + newest
def test_keep_policies(tmp_path, policy, kept):
    net = ms.nn.Dense(2, 2)
    manager = checkpoint.CheckpointManager(str(tmp_path), "m", keep=2, policy=policy)
    for epoch, metric in enumerate([0.9, 0.1, 0.8, 0.2]):
        manager.save(net, dict(epoch=epoch, global_step=epoch, metric=metric), is_best=epoch == 0)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ckpt"))
    assert files == ["m-best.ckpt"] + [f"m-e{e:03d}.ckpt" for e in kept]
    reopened = checkpoint.CheckpointManager(str(tmp_path), "m", keep=2, policy=policy)
    assert [e["file"] for e in reopened.entries] == [f"m-e{e:03d}.ckpt" for e in kept]


@pytest.mark.slow
def test_freeze_backbone_and_backbone_lr_scale(tiny, tmp_path):
    args = BASE + [f"--data_dir={tiny}", "--epoch_size=1", "--val_while_train=False", "--keep_checkpoint_max=1"]
    start = train(train_job_of(args + [f"--ckpt_save_dir={tmp_path / 'a'}"]))
    before = _weights(find_checkpoint(start["run_dir"]))
    frozen = train(train_job_of(args + [f"--ckpt_save_dir={tmp_path / 'b'}", f"--ckpt_path={start['run_dir']}",
                                        "--freeze_backbone"]))
    after = _weights(find_checkpoint(frozen["run_dir"]))
    np.testing.assert_array_equal(after["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])
    assert not np.array_equal(after["classifier.weight"], before["classifier.weight"])
    slow = train(train_job_of(args + [f"--ckpt_save_dir={tmp_path / 'c'}", f"--ckpt_path={start['run_dir']}",
                                      "--backbone_lr_scale=0", "--opt=sgd"]))
    lr0 = _weights(find_checkpoint(slow["run_dir"]))
    np.testing.assert_array_equal(lr0["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])
    assert not np.array_equal(lr0["classifier.weight"], before["classifier.weight"])


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
@pytest.mark.slow
def test_mixed_precision_levels_train(tiny, tmp_path, level):
    result = train(train_job_of(BASE + [f"--data_dir={tiny}", f"--ckpt_save_dir={tmp_path}", "--epoch_size=2",
                                        f"--amp_level={level}", "--loss_scale_type=dynamic", "--loss_scale=1024"]))
    assert np.isfinite(result["train_loss"]) and result["global_step"] == 8
    assert np.isfinite(result["val_top1"])  # float16 evaluation takes MindSpore's kernels, not the fused native ones
    weights = _weights(find_checkpoint(result["run_dir"]))
    assert weights["conv1.weight"].dtype == np.float32  # master weights stay float32
