"""Train a ResNet-family model: `python train.py -c configs/<family>/<recipe>.yaml [--flag=value ...]`.

Settings, their defaults and both flag dialects are listed by `python train.py --help`.
"""
from __future__ import annotations

import sys

from config import configure, train_job
from resgarden.base.runner import run


def _train(argv: list[str] | None) -> str | None:
    cfg = configure(argv, prog="train.py", description=__doc__)
    from resgarden.training.trainer import train  # the engine after the device target is chosen

    result = train(train_job(cfg))
    if result["rank"] != 0:  # data-parallel: rank 0 speaks for the job
        return None
    accuracy = f", val top-1 {result['val_top1']:.2f}%" if "val_top1" in result else ""
    return f"done: {result['epoch']} epochs, train loss {result['train_loss']:.4f}{accuracy}; run folder {result['run_dir']}"


def main(argv: list[str] | None = None) -> int:
    return run("train.py", lambda: _train(argv), on_interrupt="interrupted; resume with --resume=<run folder>")


if __name__ == "__main__":
    sys.exit(main())
