"""Bad input and failing disks end in one line, leave nothing half-written and keep runs apart."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import mindspore as ms
import numpy as np
import pytest

import export as export_entry
import infer as infer_entry
import train as train_entry
import validate as validate_entry
from models import checkpoint
from resgarden.base.errors import EXIT_PREEMPTED
from resgarden.data.datasets import DataError, scan_class_folders
from resgarden.training import trainer
from resgarden.training.plot import needs_log_scale
from resgarden.training.trainer import train
from tests.helpers import start_train, train_job_of, wait_for_output, write_imagenet_layout

ENTRY_POINTS = {"train.py": train_entry.main, "validate.py": validate_entry.main, "export.py": export_entry.main,
                "infer.py": infer_entry.main,
                "eval.py": lambda argv: validate_entry.main(argv, prog="eval.py")}


@pytest.mark.parametrize("argv,message", [
    (["--batch_size=0"], "--batch_size=0: must be a number >= 1"),
    (["--scale", "1.0", "0.08"], "--scale=1 0.08: must be two numbers min max with 0 < min <= max <= 1"),
    (["--mean", "0.5", "0.5"], "--mean=0.5 0.5: must be three numbers in [0, 1] (R G B, 0-1 scale)"),
    (["--hflip=1.5"], "--hflip=1.5: must be in [0, 1]"),
    (["--lr=inf"], "--lr=inf: must be a number > 0"),
    (["--milestones", "60", "30"], "--milestones=60 30: must be increasing epoch numbers >= 1"),
    (["--min_lr=0.5", "--lr=0.1"], "--min_lr=0.5 is above --lr=0.1"),
])
def test_out_of_range_settings_are_one_line_in_every_entry_point(capsys, argv, message):
    for prog, main in ENTRY_POINTS.items():
        assert main(argv) == 2, prog
        err = capsys.readouterr().err.strip()
        assert err == f"{prog}: error: {message}", err


def test_an_empty_class_folder_is_named(tmp_path):
    write_imagenet_layout(str(tmp_path), per_class=1, splits=("train",))
    os.makedirs(tmp_path / "train" / "n09999999")
    (tmp_path / "train" / "n09999999" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) without images .*: n09999999; add images"):
        scan_class_folders(str(tmp_path / "train"))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    start, claimed = threading.Barrier(6), []

    def claim() -> None:
        start.wait()
        claimed.append(trainer._run_dirs(str(tmp_path), None, claim=True)[0])

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 6 and all(os.path.isdir(d) for d in claimed)


def _tiny_run(tmp_path, *extra: str) -> list[str]:
    write_imagenet_layout(str(tmp_path / "data"), per_class=4, size=36)
    return ["--model=resnet18", "--image_size=32", "--batch_size=8", "--num_parallel_workers=1",
            f"--data_dir={tmp_path / 'data'}", f"--output_path={tmp_path / 'runs'}", "--val_while_train=False", *extra]


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, saves = checkpoint.ms.save_checkpoint, []

    def save_until_the_disk_fills(cell, path, **kwargs):
        saves.append(path)
        if len(saves) > 2:  # epoch 1 and its best copy fit; epoch 2 does not
            with open(path, "wb") as handle:
                handle.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(cell, path, **kwargs)

    monkeypatch.setattr(checkpoint.ms, "save_checkpoint", save_until_the_disk_fills)
    assert train_entry.main(_tiny_run(tmp_path, "--epoch_size=2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: cannot write ") and err.endswith("resnet18-e002.ckpt: No space left on device")
    (run_dir,) = os.listdir(tmp_path / "runs")
    ckpt_dir = tmp_path / "runs" / run_dir / "ckpt_0"
    assert sorted(os.listdir(ckpt_dir)) == ["checkpoints.json", "resnet18-best.ckpt", "resnet18-e001.ckpt"]
    assert checkpoint.load_training_state  # the epoch-1 checkpoint still reads:
    checkpoint.open_checkpoint(str(ckpt_dir / "resnet18-e001.ckpt"))


@pytest.mark.slow
def test_resume_remembers_the_run_and_extends_it(tmp_path, caplog, capsys):
    """``--resume=<run>`` alone restores the run's settings; a larger --epoch_size extends the run;
    a finished run, another model or other classes are one line; stale temp files go."""
    assert train_entry.main(_tiny_run(tmp_path, "--epoch_size=1", "--lr=0.05")) == 0
    (run_dir,) = os.listdir(tmp_path / "runs")
    run_dir = tmp_path / "runs" / run_dir
    ckpt_dir = run_dir / "ckpt_0"
    capsys.readouterr()
    assert train_entry.main([f"--resume={run_dir}"]) == 2
    assert capsys.readouterr().err.strip().endswith("already finished epoch 1 of --epoch_size=1: give a larger "
                                                    "--epoch_size to train on")
    assert train_entry.main([f"--resume={run_dir}", "--model=resnet34", "--epoch_size=2"]) == 2
    assert "was trained as resnet18, not --model=resnet34" in capsys.readouterr().err
    for stale in (".resnet18-e002.ckpt.k3j2.ckpt", ".tmp-ab12.ckpt", ".checkpoints.json.x1.partial"):
        (ckpt_dir / stale).write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="resgarden"):
        assert train_entry.main([f"--resume={run_dir}", "--epoch_size=2"]) == 0
    assert "removed 3 temporary file(s) an interrupted save left" in caplog.text
    assert "the learning-rate schedule differs from the checkpoint's (2 -> 4 optimizer steps)" in caplog.text
    assert "model resnet18: 4 classes" in caplog.text and "lr 0.05" not in caplog.text
    assert not [f for f in os.listdir(ckpt_dir) if f.startswith(".")]
    assert "resnet18-e002.ckpt" in os.listdir(ckpt_dir)
    saved = (run_dir / "config.yaml").read_text()
    assert "epoch_size: 2" in saved and "image_size: 32" in saved and "lr: 0.05" in saved


@pytest.mark.slow
def test_resuming_on_other_classes_names_both_sides(tmp_path, capsys):
    assert train_entry.main(_tiny_run(tmp_path, "--epoch_size=1")) == 0
    (run_dir,) = os.listdir(tmp_path / "runs")
    other = tmp_path / "other"
    write_imagenet_layout(str(other), per_class=4, size=36, classes=("n01440764", "n01443537", "n01484850", "cat"))
    capsys.readouterr()
    assert train_entry.main([f"--resume={tmp_path / 'runs' / run_dir}", f"--data_dir={other}", "--epoch_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was trained on 4 classes, " in err and "has 4 (e.g. cat, n01491361 in one only)" in err


def test_the_loss_panel_turns_logarithmic_for_an_outlier():
    assert needs_log_scale([2.1, 304.0, 1.2, 1.0, 0.9])  # the quick start's first validation loss
    assert not needs_log_scale([2.3, 1.4, 0.9, 0.7])


def _weights(path: str) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items() if not k.startswith("meta.")}


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_checkpoint_and_the_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                           capsys):
    data = _tiny_run(tmp_path, "--epoch_size=2", "--batch_size=4")  # 4 steps an epoch, default augmentation
    whole = train(train_job_of(data + [f"--output_path={tmp_path / 'whole'}"]))
    real_steps, calls = trainer.batch_steps, []

    def terminated_after_two_steps(cell, dataset, source):
        calls.append(source)
        for done, step in enumerate(real_steps(cell, dataset, source), 1):
            if len(calls) == 1 and done == 2:  # during step 2: what a scheduler sends before it kills a job
                os.kill(os.getpid(), signal.SIGTERM)
            yield step

    monkeypatch.setattr(trainer, "batch_steps", terminated_after_two_steps)
    assert train_entry.main(data + [f"--output_path={tmp_path / 'cut'}"]) == EXIT_PREEMPTED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    (run_dir,) = os.listdir(tmp_path / "cut")
    run_dir = tmp_path / "cut" / run_dir
    assert err == (f"train.py: stopped by SIGTERM at epoch 1 step 2/4; checkpoint {run_dir}/ckpt_0/"
                   f"resnet18-e001-step000002.ckpt; resume with: python train.py --resume={run_dir}")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(trainer, "batch_steps", real_steps)
    assert train_entry.main([f"--resume={run_dir}", "--num_parallel_workers=1"]) == 0
    assert sorted(f for f in os.listdir(run_dir / "ckpt_0") if "step" in f) == []  # superseded by epoch 1's
    want = _weights(os.path.join(whole["run_dir"], "ckpt_0", "resnet18-e002.ckpt"))
    got = _weights(str(run_dir / "ckpt_0" / "resnet18-e002.ckpt"))
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst < 1e-5, f"resumed weights differ by {worst}"


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_is_reported_as_ctrl_c(tmp_path):
    """Ctrl-C in a terminal: SIGINT to train.py and its data workers, mid-step in graph mode, where
    MindSpore's own SIGINT handler would turn it into SIGTERM (preemption.route_ctrl_c)."""
    write_imagenet_layout(str(tmp_path / "data"), per_class=100, size=40, splits=("train",))  # 100 steps
    proc, lines, reader = start_train(["--model=resnet18", "--image_size=32", "--batch_size=4", "--num_parallel_workers=2",
                               "--epoch_size=50", "--log_interval=1", "--val_while_train=False",
                               f"--data_dir={tmp_path / 'data'}", f"--output_path={tmp_path / 'runs'}"],
                              start_new_session=True)  # its own process group
    wait_for_output(proc, lines, "step 3/")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, "".join(lines)[-3000:]
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Ctrl-C (SIGINT) received: finishing this step" in output, output[-3000:]
    assert "train.py: stopped by Ctrl-C (SIGINT) at epoch 1 step " in output, output[-3000:]
    assert "SIGTERM" not in output, output[-3000:]


@pytest.mark.slow
def test_a_non_finite_loss_ends_the_run_in_one_line(tmp_path, capsys):
    assert train_entry.main(_tiny_run(tmp_path, "--epoch_size=2", "--batch_size=4", "--lr=1e38", "--log_interval=1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: the training loss is not finite at step ") and "lower --lr" in err


SHUTDOWN = """
import atexit, gc
import models
from mindspore.nn import cell
net = models.create_model("resnet18", num_classes=4)
atexit._run_exitfuncs()  # interpreter shutdown runs the exit handlers first,
for name in ("_cell_graph_executor", "cells_compile_cache", "Cell"):  # then clears module globals,
    setattr(cell, name, None)
del net  # then frees what is left
gc.collect()
"""


@pytest.mark.slow
def test_no_cell_destructor_noise_at_interpreter_exit():
    """MindSpore's Cell.__del__ reads module globals that shutdown has cleared: without
    resgarden.platform.quiet_cell_teardown each Cell alive at exit prints an 'Exception ignored' block."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SHUTDOWN], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]
