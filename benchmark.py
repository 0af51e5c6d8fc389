"""Training-step and inference throughput of our models, optionally against timm in the same run.

    python benchmark.py --models resnet50 res2net50 --modes graph --compare-timm

Every measurement runs in a fresh subprocess; with --compare-timm, MindSpore and timm runs
alternate (--repeats times each) and the table shows medians and the MindSpore/timm ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from resgarden.bench import TIMM_NAMES, measure_pipeline, run_worker


def _measure(python: str, framework: str, model: str, task: str, mode: str, batch: int, size: int,
             steps: int) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", framework, "--models", model, "--tasks", task,
           "--modes", mode, "--train-batch", str(batch), "--infer-batch", str(batch), "--image-size", str(size),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{framework} {model} {task} {mode} failed: {tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "res2net50"])
    parser.add_argument("--modes", nargs="+", choices=["graph", "pynative"], default=["graph"])
    parser.add_argument("--tasks", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compile + one warm-up step")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per framework")
    parser.add_argument("--compare-timm", action="store_true", help="also measure timm's model (needs torch, timm)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="Python that has torch and timm (default: this one)")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: data pipeline img/s (JPEG decode + training augmentation) per worker count")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="--pipeline: map workers to try")
    parser.add_argument("--auto_augment", default=None, help="--pipeline: also apply this policy")
    parser.add_argument("--worker", choices=["mindspore", "timm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.models[0], args.tasks[0], args.modes[0], args.train_batch,
                   args.image_size, args.steps)
        return 0

    if args.pipeline:
        print(f"{'workers':>7s} {'batch':>5s} {'size':>4s} {'augment':16s} {'img/s':>8s}")
        for workers in args.workers:
            result = measure_pipeline(workers, args.image_size, args.train_batch, auto_augment=args.auto_augment)
            print(f"{workers:7d} {args.train_batch:5d} {args.image_size:4d} {args.auto_augment or 'rrc+flip':16s} "
                  f"{result['img_s']:8.1f}", flush=True)
        return 0
    unknown = [m for m in args.models if m not in TIMM_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(TIMM_NAMES)}")
    print(f"{'model':18s} {'task':5s} {'mode':8s} {'batch':>5s} {'MS img/s':>9s} {'compile s':>9s} "
          f"{'peak MB':>8s}" + (f" {'timm img/s':>10s} {'MS/timm':>7s}" if args.compare_timm else ""))
    notes = set()
    for model in args.models:
        for task in args.tasks:
            batch = args.train_batch if task == "train" else args.infer_batch
            timm_runs = []
            for mode in args.modes:
                ms_runs = []
                for _ in range(args.repeats):
                    ms_runs.append(_measure(sys.executable, "mindspore", model, task, mode, batch,
                                            args.image_size, args.steps))
                    if args.compare_timm and len(timm_runs) < args.repeats:
                        timm_runs.append(_measure(args.torch_python, "timm", model, task, mode, batch,
                                                  args.image_size, args.steps))
                ms_rate = statistics.median(r["img_s"] for r in ms_runs)
                line = (f"{model:18s} {task:5s} {mode:8s} {batch:5d} {ms_rate:9.2f} "
                        f"{statistics.median(r['first_call_s'] for r in ms_runs):9.1f} "
                        f"{max(r['peak_rss_mb'] for r in ms_runs):8.0f}")
                notes.add(ms_runs[0]["note"])
                if args.compare_timm:
                    timm_rate = statistics.median(r["img_s"] for r in timm_runs)
                    notes.add(timm_runs[0]["note"])
                    line += f" {timm_rate:10.2f} {ms_rate / timm_rate:7.2f}"
                print(line, flush=True)
    for note in sorted(notes):
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
