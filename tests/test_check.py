"""The device check (``python -m resgarden.check``): on CPU as a single process and as 2 ranks under
msrun, its report, its exit code, and the comparisons it judges by."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from resgarden.check import __main__ as check_main
from resgarden.check.numerics import ROUNDING, SENSITIVITY_FACTOR, compare, recipe_levels
from resgarden.check.report import Result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--models", "resnet18", "--image_size", "32", "--speed_model", "resnet18", "--speed_image_size", "32",
         "--speed_batch_size", "4", "--speed_steps", "2", "--pipeline_images", "8"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MS_"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1")
    return env


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_the_check_on_cpu_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "resgarden.check", *SMALL, "--json", str(tmp_path / "r.json"),
                           "--markdown", str(tmp_path / "r.md")], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    checks = _checks(report)
    assert report["passed"] and report["ranks"] == "1 (single process)" and report["mindspore"] == ms.__version__
    assert checks["MindSpore run_check()"]["status"] == "pass"
    model = checks["resnet18 O0 vs float32 on CPU"]
    assert model["status"] == "pass" and model["numbers"]["logits err"] < 1e-4 and model["numbers"]["update err"] < 1e-2
    assert checks["overflow on rank 0 (O0)"]["numbers"]["skipped"] == [1]
    assert checks["overflow on rank 0 (O0)"]["numbers"]["scale"] == [512.0]
    assert checks["dataset sink mode (8 steps)"]["status"] == "skip"
    assert checks["ranks in sync after 3 data-parallel steps"]["status"] == "skip"
    pipeline = checks["input pipeline vs resnet18 at 32 px, batch 4, O0"]
    assert pipeline["status"] in ("pass", "warn") and pipeline["numbers"]["pipeline img/s"] > 0
    markdown = (tmp_path / "r.md").read_text()
    assert markdown in done.stdout and "| resnet18 O0 vs float32 on CPU | pass |" in markdown
    assert "**all checks passed**" in markdown


@pytest.mark.slow
def test_the_check_under_msrun_checks_every_rank(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    done = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
                           f"--log_dir={tmp_path / 'logs'}", "python", "-m", "resgarden.check", *SMALL,
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    checks = _checks(report)
    assert report["passed"] and report["ranks"] == "2 (msrun/dynamic_cluster)"
    assert all(c["ranks"] in (["pass", "pass"], ["skip", "skip"], ["warn", "warn"], ["pass", "warn"], ["warn", "pass"])
               for c in report["checks"])
    assert checks["overflow on rank 1 (O0)"]["ranks"] == ["pass", "pass"]
    assert checks["ranks in sync after 3 data-parallel steps"]["ranks"] == ["pass", "pass"]
    assert "data loading: node of ranks 0-1:" in (tmp_path / "logs" / "worker_0.log").read_text(errors="replace")


def test_a_failed_check_exits_1_with_the_report(monkeypatch, capsys):
    previous = ms.get_context("mode")
    monkeypatch.setattr(check_main, "_run_checks", lambda args, target, cluster, work: [
        Result("a wrong kernel", "fail", "differs"), Result("fine", "pass")])
    try:
        assert check_main.main(["--models", "resnet18", "--speed_model", "resnet18"]) == 1
    finally:
        ms.set_context(mode=previous)
    out = capsys.readouterr().out
    assert "| a wrong kernel | fail |" in out and "**FAILED: a wrong kernel**" in out


def test_an_unknown_model_is_one_line(capsys):
    assert check_main.main(["--models", "resnet5O"]) == 2
    assert "resnet5O" in capsys.readouterr().err


def _side(update: np.ndarray, perturbed: np.ndarray | None = None, skipped: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    return dict(logits=rs.normal(size=(2, 10)), loss=np.float32(2.3), statistics=rs.normal(size=50),
                update=update, skipped=np.int32(skipped),
                update_perturbed=update if perturbed is None else perturbed)


def test_the_comparison_tells_a_wrong_gradient_from_rounding():
    update = np.random.RandomState(1).normal(size=1000)
    cpu = _side(update, perturbed=update * (1 + 1e-4))  # rounding moves this update by 1e-4
    assert compare("m", "O0", _side(update * (1 + 5e-3)), cpu).status == "pass"
    wrong = compare("m", "O0", _side(update * 1.3), cpu)
    assert wrong.status == "fail" and "update differs by 0.3" in wrong.note
    # a model whose update rounding moves by 2 % may differ by 10x that, not by more
    sensitive = _side(update, perturbed=update * 1.02)
    assert compare("m", "O0", _side(update * 1.15), sensitive).status == "pass"
    assert compare("m", "O0", _side(update * 1.25), sensitive).status == "fail"
    assert SENSITIVITY_FACTOR == 10.0 and ROUNDING == 2.0 ** -11
    skipped = compare("m", "O2", _side(update, skipped=1), cpu)
    assert skipped.status == "fail" and "skipped" in skipped.note


def test_each_model_is_checked_at_its_recipes_amp_levels():
    configs = os.path.join(ROOT, "configs")
    assert recipe_levels("resnet50", configs) == ("O0", "O2")
    assert recipe_levels("res2net50", configs) == ("O0", "O2", "O3")
    assert recipe_levels("resnet18", configs) == ("O0",)
