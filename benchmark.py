"""Training-step and inference throughput of our models, optionally against timm in the same run;
or the input pipeline's, against mindcv's loader.

    python benchmark.py --models resnet50 res2net50 --modes graph --compare-timm
    python benchmark.py --models resnet50 --compare-timm --isa avx2   # an AVX2-only CPU, simulated
    python benchmark.py --pipeline --compare-mindcv --workers 1 2 --repeats 3 --seconds 5 --json pipeline.json

Every measurement runs in a fresh subprocess; with --compare-timm / --compare-mindcv the two sides
alternate (--repeats times each) and the table shows medians and their ratio. ``--isa avx2`` caps
both frameworks at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2`` for both, ``ATEN_CPU_CAPABILITY=avx2`` for
PyTorch), to measure an AVX2-only processor on an AVX-512 one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from resgarden.bench import TIMM_NAMES, run_worker
from resgarden.bench_pipeline import TRANSFORMS, write_photo_folder


ISA_CAPS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _measure(python: str, framework: str, model: str, task: str, mode: str, batch: int, size: int,
             steps: int, isa: str = "native") -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", framework, "--models", model, "--tasks", task,
           "--modes", mode, "--train-batch", str(batch), "--infer-batch", str(batch), "--image-size", str(size),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ISA_CAPS[isa]},
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{framework} {model} {task} {mode} failed: {tail}")


def _measure_loader(loader: str, photos: str, transform: str, workers: int, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", loader, "--photos", photos, "--transforms", transform,
           "--workers", str(workers), "--seconds", str(args.seconds), "--image-size", str(args.image_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])["img_s"]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{loader} {transform} loader with {workers} workers failed: {tail}")


def _pipeline(args) -> int:
    """Medians of alternating project / mindcv runs per (transform, workers); table and JSON rows."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        photos = args.photos or write_photo_folder(scratch)
        rows = []
        print(f"{'transform':12s} {'workers':>7s} {'project img/s':>13s}"
              + (f" {'mindcv img/s':>12s} {'ratio':>6s}" if args.compare_mindcv else ""), flush=True)
        for transform in args.transforms:
            for workers in args.workers:
                ours, theirs = [], []
                for _ in range(args.repeats):
                    ours.append(_measure_loader("project", photos, transform, workers, args))
                    if args.compare_mindcv:
                        theirs.append(_measure_loader("mindcv", photos, transform, workers, args))
                row = dict(transform=transform, workers=workers, project_img_s=round(statistics.median(ours), 1))
                line = f"{transform:12s} {workers:7d} {row['project_img_s']:13.1f}"
                if args.compare_mindcv:
                    row.update(mindcv_img_s=round(statistics.median(theirs), 1))
                    row.update(ratio=round(row["project_img_s"] / row["mindcv_img_s"], 2))
                    line += f" {row['mindcv_img_s']:12.1f} {row['ratio']:6.2f}"
                rows.append(row)
                print(line, flush=True)
    print(f"# medians of {args.repeats} alternating runs of {args.seconds:g} s each, batch 32, {args.image_size} px, "
          f"500x375 photo JPEGs; {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0


def _models(args) -> int:
    """Medians of alternating MindSpore / timm runs per (model, task, mode); one table row each."""
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
                                            args.image_size, args.steps, args.isa))
                    if args.compare_timm and len(timm_runs) < args.repeats:
                        timm_runs.append(_measure(args.torch_python, "timm", model, task, mode, batch,
                                                  args.image_size, args.steps, args.isa))
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
    if args.isa != "native":
        print("# capped: " + " ".join(f"{k}={v}" for k, v in ISA_CAPS[args.isa].items()))
    return 0


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
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default="native",
                        help="avx2: cap oneDNN (both frameworks) and PyTorch's kernels at AVX2")
    parser.add_argument("--compare-timm", action="store_true", help="also measure timm's model (needs torch, timm)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="Python that has torch and timm (default: this one)")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: input pipeline img/s (decode, augment, normalise, batch of 32) per worker count")
    parser.add_argument("--compare-mindcv", action="store_true", help="--pipeline: also measure mindcv's loader")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="--pipeline: worker counts to try")
    parser.add_argument("--transforms", nargs="+", choices=TRANSFORMS, default=list(TRANSFORMS),
                        help="--pipeline: standard training (RandomResizedCrop + flip), with RandAugment, evaluation")
    parser.add_argument("--seconds", type=float, default=5.0, help="--pipeline: seconds read per measurement")
    parser.add_argument("--photos", default=None, help="--pipeline: folder of photo JPEGs (default: written anew)")
    parser.add_argument("--json", default=None, help="--pipeline: also write the rows to this JSON file")
    parser.add_argument("--worker", choices=["mindspore", "timm", "project", "mindcv"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker in ("project", "mindcv"):
        from resgarden.bench_pipeline import measure

        result = measure(args.worker, args.photos, args.transforms[0], args.workers[0], args.seconds,
                         args.train_batch, args.image_size)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.worker:
        run_worker(args.worker, args.models[0], args.tasks[0], args.modes[0], args.train_batch,
                   args.image_size, args.steps)
        return 0
    if args.pipeline:
        return _pipeline(args)
    unknown = [m for m in args.models if m not in TIMM_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(TIMM_NAMES)}")
    return _models(args)


if __name__ == "__main__":
    sys.exit(main())
