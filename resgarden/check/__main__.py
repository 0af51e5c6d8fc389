"""``python -m resgarden.check``: the device check (see the package docstring); under a launcher
(``mpirun -n 8 python -m resgarden.check``, ``msrun ... python -m resgarden.check``) every rank
checks its own device and rank 0 writes the report. Exit code 1 when a check failed on any rank."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time

from resgarden.base.runner import run

from .numerics import SEED_MODELS, NumericsSpec, recipe_levels
from .report import STATUSES, Result
from .throughput import ThroughputSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
logger = logging.getLogger("resgarden")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resgarden.check", description=__doc__)
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--markdown", help="write the report as Markdown to this file (it is also printed)")
    parser.add_argument("--device_target", default="auto", choices=["auto", "CPU", "GPU", "Ascend"])
    parser.add_argument("--device_id", type=int, default=None, help="a single process's device")
    parser.add_argument("--models", nargs="+", default=list(SEED_MODELS), help="models whose numerics are checked")
    parser.add_argument("--image_size", type=int, default=64, help="input size of the numerics checks")
    parser.add_argument("--batch_size", type=int, default=4, help="batch of the numerics checks")
    parser.add_argument("--speed_model", default="resnet50", help="the model whose training rate the pipeline must keep up with")
    parser.add_argument("--speed_image_size", type=int, default=224)
    parser.add_argument("--speed_batch_size", type=int, default=32, help="per rank")
    parser.add_argument("--speed_steps", type=int, default=5)
    parser.add_argument("--pipeline_images", type=int, default=256, help="JPEGs the pipeline check decodes")
    parser.add_argument("--jit_level", default="auto", choices=["auto", "O0", "O1", "O2"])
    parser.add_argument("--dist_port", type=int, default=8118, help="scheduler port under mpirun / srun")
    parser.add_argument("--dist_timeout", type=int, default=60)
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # the CPU reference child's work folder
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "speed_image_size", "speed_batch_size", "speed_steps", "pipeline_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.pipeline_images < 2 * args.speed_batch_size:
        parser.error(f"--pipeline_images must be at least 2 batches ({2 * args.speed_batch_size}) to time the pipeline")
    return args


def main(argv: list[str] | None = None) -> int:
    outcome: dict[str, bool] = {}
    code = run("python -m resgarden.check", lambda: _check(parse_args(argv), outcome))
    return code or (1 if outcome.get("failed") else 0)


def _check(args: argparse.Namespace, outcome: dict[str, bool]) -> str | None:
    from resgarden.platform import select_device_target

    if args.reference:  # the CPU reference child of the numerics check
        select_device_target("CPU")
        import mindspore as ms

        from .numerics import reference
        ms.set_context(mode=ms.PYNATIVE_MODE)
        reference(args.models, args.reference)
        return None
    target = select_device_target(args.device_target)
    from resgarden.base.logs import setup_logging
    from resgarden.base.specs import ClusterSpec, ContextSpec
    from resgarden.runtime.context import check_model, set_context
    from resgarden.runtime.distributed import find_launcher, init_cluster

    for name in {*args.models, args.speed_model}:
        check_model(name)
    distribute = find_launcher(os.environ) is not None
    set_context(ContextSpec(device_target=target, mode=1, jit_level=args.jit_level, device_id=args.device_id,
                            distribute=distribute))
    cluster = init_cluster(ClusterSpec(distribute=distribute, device_target=target, device_id=args.device_id,
                                       dist_port=args.dist_port, dist_timeout=args.dist_timeout))
    if not cluster.is_main:
        setup_logging(quiet=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resgarden-check-") as work:
        results = _run_checks(args, target, cluster, work)
    table = cluster.gather([r.code for r in results]).astype(int)
    for column, result in enumerate(results):
        result.ranks = [STATUSES[code] for code in table[:, column]]
        result.status = STATUSES[table[:, column].max()]  # the worst rank's
    outcome["failed"] = any(r.status == "fail" for r in results)
    if not cluster.is_main:
        return None
    facts = _facts(target, cluster, time.perf_counter() - started)
    from .report import as_json, markdown, write

    text = markdown(results, facts)
    if args.markdown:
        write(args.markdown, text)
    if args.json:
        write(args.json, as_json(results, facts))
    return text


def _run_checks(args: argparse.Namespace, target: str, cluster, work: str) -> list[Result]:
    """Every check in the same order on every rank (they run collectives)."""
    from resgarden.runtime.distributed import nodes

    from . import numerics, throughput, training

    fp16 = target != "CPU"  # CPU trains in float32: the recipes' float16 levels are for GPU / Ascend
    configs = os.path.join(ROOT, "configs")
    levels = {m: recipe_levels(m, configs) if fp16 else ("O0",) for m in args.models}
    spec = NumericsSpec(levels, args.image_size, args.batch_size)
    results = [_timed(_run_check)]
    numerics.write_initial_weights(spec, work, cluster)
    ranks_here = len(next(g for g in nodes(cluster) if cluster.rank in g))
    threads = max(1, len(os.sched_getaffinity(0)) // ranks_here) if hasattr(os, "sched_getaffinity") else 1
    child = numerics.start_reference(spec, work, threads)
    started = time.perf_counter()
    model_results = numerics.check_models(spec, work, cluster, child)
    for result in model_results:
        result.numbers["seconds"] = round((time.perf_counter() - started) / len(model_results), 1)
    results += model_results
    results.append(_timed(training.check_overflow, cluster, "O2" if fp16 else "O0"))
    results.append(_timed(training.check_sink, target, args.jit_level, cluster))
    results.append(_timed(training.check_in_sync, cluster))
    speed_levels = [lvl for lvl in recipe_levels(args.speed_model, configs) if lvl != "O0"] if fp16 else []
    speed = ThroughputSpec(args.speed_model, args.speed_image_size, args.speed_batch_size,
                           speed_levels[0] if speed_levels else "O0", args.speed_steps, args.pipeline_images)
    results.append(_timed(throughput.check_input_bound, speed, work, cluster))
    if not fp16:
        results.append(Result("float16 levels", "skip", "CPU trains in float32; the recipes' float16 AMP levels are "
                                                       "checked on GPU / Ascend"))
    return results


def _timed(check, *args) -> Result:
    started = time.perf_counter()
    logger.info("check: %s", getattr(check, "__name__", "check").lstrip("_"))
    result = check(*args)
    result.numbers["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _run_check() -> Result:
    """MindSpore's own installation check."""
    import mindspore as ms

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        ms.run_check()
    said = [line.strip() for line in output.getvalue().splitlines() if line.strip()]
    ok = any("successfully" in line for line in said)
    return Result("MindSpore run_check()", "pass" if ok else "fail", said[-1] if said else "said nothing")


def _facts(target: str, cluster, seconds: float) -> dict[str, str]:
    from .report import device_name, versions

    facts = {k: v for k, v in versions(ROOT).items()}
    facts["device"] = f"{target} {cluster.device_id}: {device_name(target, cluster.device_id)}"
    facts["cpu"] = device_name("CPU", 0)
    facts["ranks"] = f"{cluster.size} ({cluster.launcher})" if cluster.distributed else "1 (single process)"
    facts["took"] = f"{seconds:.0f} s"
    return facts


if __name__ == "__main__":
    sys.exit(main())
