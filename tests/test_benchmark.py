"""benchmark.py's interleaved harness: a worker process compiles once, then times the rounds its
parent asks for; a worker that cannot start is one clear error, not a hang."""
import sys

import pytest

import benchmark


@pytest.mark.slow
def test_a_worker_serves_timed_rounds_then_its_peak_memory():
    worker = benchmark._Worker(sys.executable, "mindspore", "resnet18", "infer", "pynative", 2, 32, "native")
    try:
        assert worker.ready["first_call_s"] > 0 and worker.ready["note"] and worker.ready["timm"] == "resnet18"
        rounds = [worker.seconds(2), worker.seconds(1)]
    finally:
        result = worker.close()
    assert all(seconds > 0 for seconds in rounds)
    assert result["peak_rss_mb"] > 100  # MindSpore alone is more than that


def test_a_worker_that_fails_to_start_reports_its_last_error_line(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'ImportError: no timm here' >&2\nexit 3\n")
    python.chmod(0o755)
    with pytest.raises(RuntimeError, match="timm resnet50 train graph failed: ImportError: no timm here"):
        benchmark._Worker(str(python), "timm", "resnet50", "train", "graph", 8, 224, "native")


def test_the_table_reports_the_median_of_per_round_ratios(monkeypatch, capsys):
    started = []

    class FakeWorker:
        """MindSpore 2 s per round, timm 1 s then 4 s: per-round ratios 0.5 and 2."""
        def __init__(self, python, framework, model, *rest):
            self.framework, self.turn = framework, 0
            self.ready = dict(first_call_s=1.5, note=f"{framework} note")
            if framework == "mindspore":  # the real worker reads it from the model's card
                self.ready["timm"] = f"timm twin of {model}"
            started.append((framework, model))

        def seconds(self, steps):
            self.turn += 1
            return 2.0 if self.framework == "mindspore" else {1: 1.0, 2: 4.0}[self.turn]

        def close(self):
            return dict(peak_rss_mb=123.0)

    monkeypatch.setattr(benchmark, "_Worker", FakeWorker)
    monkeypatch.setattr(benchmark, "SETTLE_S", 0)
    assert benchmark.main(["--models", "resnet50", "--tasks", "train", "--compare-timm", "--repeats", "1",
                           "--rounds", "2", "--steps", "4"]) == 0
    assert started == [("mindspore", "resnet50"), ("timm", "timm twin of resnet50")]
    row = capsys.readouterr().out.splitlines()[1].split()
    # 4 steps x 8 images / 2 s = 16 img/s; timm 32 and 8 img/s (median 20); ratios 0.5 and 2 (median 1.25)
    assert row[4:] == ["16.00", "1.5", "123", "20.00", "1.25", "0.50-2.00"]


def test_a_worker_that_dies_mid_round_is_one_error_line(tmp_path, monkeypatch, capsys):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'READY {\"first_call_s\": 1.0, \"note\": \"fake\"}'\nread line\n"
                      "echo 'Fatal: worker crashed mid-round' >&2\nexit 3\n")
    python.chmod(0o755)
    monkeypatch.setattr(benchmark.sys, "executable", str(python))
    monkeypatch.setattr(benchmark, "SETTLE_S", 0)
    assert benchmark.main(["--models", "resnet50", "--tasks", "train", "--repeats", "1", "--rounds", "1",
                           "--steps", "1"]) == 1
    assert capsys.readouterr().err.strip() == (
        "benchmark.py: mindspore resnet50 train graph failed: Fatal: worker crashed mid-round")
