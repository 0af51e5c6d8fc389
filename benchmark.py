"""Training-step and inference throughput of our models, optionally against timm in the same run;
or the input pipeline's, against mindcv's loader.

    python benchmark.py --models resnet50 res2net50 --modes graph --compare-timm
    python benchmark.py --models resnet50 --compare-timm --isa avx2   # an AVX2-only CPU, simulated
    python benchmark.py --pipeline --compare-mindcv --workers 1 2 --repeats 3 --seconds 5 --json pipeline.json

Each side runs in fresh subprocesses. With --compare-timm, --repeats pairs of processes (one
MindSpore, one timm) are started; each compiles once, then the two take turns, --rounds rounds of
--steps steps each, so that the adjacent turns of a round see the same machine; the table shows
medians and the median of the per-round ratios with its range. With --compare-mindcv the two
loaders alternate fresh processes (--repeats times each). ``--isa avx2`` caps
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
import tempfile
import time

from resgarden.bench.pipeline import TRANSFORMS, write_photo_folder
from resgarden.bench.worker import serve

# Seconds between one side's turn and the other's: long enough for the idle side's spin-waiting
# threads (OpenMP's, MindSpore's kernel threads) to go to sleep.
SETTLE_S = 0.3
ISA_CAPS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


class _Worker:
    """One side of a comparison in its own process (resgarden.bench.worker.serve): compiled once, then timed
    round by round on request, so that the two frameworks' rounds can interleave."""

    def __init__(self, python: str, framework: str, model: str, task: str, mode: str, batch: int, size: int,
                 isa: str) -> None:
        self.label = f"{framework} {model} {task} {mode}"
        cmd = [python, os.path.abspath(__file__), "--worker", framework, "--models", model, "--tasks", task,
               "--modes", mode, "--train-batch", str(batch), "--infer-batch", str(batch), "--image-size", str(size)]
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, env={**os.environ, **ISA_CAPS[isa]},
                                      cwd=os.path.dirname(os.path.abspath(__file__)))
        self.ready = json.loads(self._reply("READY"))

    def _reply(self, word: str) -> str:
        for line in self._proc.stdout:
            if line.startswith(word + " "):
                return line[len(word) + 1:]
        self._proc.wait()
        self._log.seek(0)
        raise RuntimeError(f"{self.label} failed: {_last_line(self._log.read())}")

    def seconds(self, steps: int) -> float:
        """Wall time of ``steps`` more steps."""
        self._proc.stdin.write(f"RUN {steps}\n")
        self._proc.stdin.flush()
        return float(self._reply("TIME"))

    def close(self) -> dict:
        """Ends the process; its peak resident memory."""
        self._proc.stdin.write("END\n")
        self._proc.stdin.flush()
        result = json.loads(self._reply("RESULT"))
        self._proc.wait()
        self._log.close()
        return result

    def kill(self) -> None:
        """Ends the process at once (after a failure: it may be gone, or mid-round)."""
        self._proc.kill()
        self._proc.wait()
        self._log.close()


def _last_line(stderr: str) -> str:
    """A failed worker's last stderr line: its error, for a one-line message."""
    return (stderr.strip().splitlines() or ["no output"])[-1]


def _measure_loader(loader: str, photos: str, transform: str, workers: int, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", loader, "--photos", photos, "--transforms", transform,
           "--workers", str(workers), "--seconds", str(args.seconds), "--image-size", str(args.image_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])["img_s"]
    raise RuntimeError(f"{loader} {transform} loader with {workers} workers failed: {_last_line(proc.stderr)}")


def _pipeline(args) -> int:
    """Medians of alternating project / mindcv runs per (transform, workers); table and JSON rows."""
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


def _rounds(args, model: str, task: str, mode: str, batch: int) -> dict:
    """``--repeats`` fresh process pairs; in each, ``--rounds`` rounds of ``--steps`` steps per side,
    the sides taking turns (and turns in which goes first), a pause between turns so that the idle
    side's spinning threads settle. Per-round rates, per-round ratios, compile times, peak memory."""
    ms_rates, timm_rates, ratios, compile_s, peak_mb, notes = [], [], [], [], [], set()
    for _ in range(args.repeats):
        sides: list[_Worker] = []
        try:
            sides.append(_Worker(sys.executable, "mindspore", model, task, mode, batch, args.image_size, args.isa))
            if args.compare_timm:
                timm_name = sides[0].ready["timm"]  # from our model's card
                sides.append(_Worker(args.torch_python, "timm", timm_name, task, mode, batch, args.image_size, args.isa))
            for turn in range(args.rounds):
                rates = {}
                for side in (sides if turn % 2 == 0 else sides[::-1]):
                    time.sleep(SETTLE_S)
                    rates[side] = args.steps * batch / side.seconds(args.steps)
                ms_rates.append(rates[sides[0]])
                if args.compare_timm:
                    timm_rates.append(rates[sides[1]])
                    ratios.append(rates[sides[0]] / rates[sides[1]])
            results = [side.close() for side in sides]
        except BaseException:
            for side in sides:
                side.kill()
            raise
        compile_s.append(sides[0].ready["first_call_s"])
        peak_mb.append(results[0]["peak_rss_mb"])
        notes.update(side.ready["note"] for side in sides)
    return dict(ms_rates=ms_rates, timm_rates=timm_rates, ratios=ratios, compile_s=compile_s, peak_mb=peak_mb,
                notes=notes)


def _models(args) -> int:
    """One table row per (model, task, mode): medians over all rounds, the ratio's the median of the
    per-round ratios (each from adjacent turns), with its lowest and highest."""
    print(f"{'model':18s} {'task':5s} {'mode':8s} {'batch':>5s} {'MS img/s':>9s} {'compile s':>9s} "
          f"{'peak MB':>8s}" + (f" {'timm img/s':>10s} {'MS/timm':>7s} {'range':>9s}" if args.compare_timm else ""))
    notes = set()
    for model in args.models:
        for task in args.tasks:
            batch = args.train_batch if task == "train" else args.infer_batch
            for mode in args.modes:
                row = _rounds(args, model, task, mode, batch)
                notes |= row["notes"]
                line = (f"{model:18s} {task:5s} {mode:8s} {batch:5d} {statistics.median(row['ms_rates']):9.2f} "
                        f"{statistics.median(row['compile_s']):9.1f} {max(row['peak_mb']):8.0f}")
                if args.compare_timm:
                    line += (f" {statistics.median(row['timm_rates']):10.2f} {statistics.median(row['ratios']):7.2f} "
                             f"{min(row['ratios']):4.2f}-{max(row['ratios']):4.2f}")
                print(line, flush=True)
    for note in sorted(notes):
        print(f"# {note}")
    print(f"# {args.repeats} process pair(s) x {args.rounds} interleaved rounds of {args.steps} steps per side")
    if args.isa != "native":
        print("# capped: " + " ".join(f"{k}={v}" for k, v in ISA_CAPS[args.isa].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "res2net50"])
    parser.add_argument("--modes", nargs="+", choices=["graph", "pynative"], default=["graph"])
    parser.add_argument("--tasks", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per round (after compile + one warm-up step); --pipeline: unused")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per process, the two frameworks' interleaved")
    parser.add_argument("--repeats", type=int, default=2,
                        help="fresh processes per framework (--pipeline: alternating runs)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker in ("project", "mindcv"):
        from resgarden.bench.pipeline import measure

        result = measure(args.worker, args.photos, args.transforms[0], args.workers[0], args.seconds,
                         args.train_batch, args.image_size)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.worker:
        serve(args.worker, args.models[0], args.tasks[0], args.modes[0], args.train_batch, args.image_size)
        return 0
    try:
        return _pipeline(args) if args.pipeline else _models(args)
    except (RuntimeError, OSError) as error:
        print(f"benchmark.py: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
