"""Average the last or best checkpoints of a training run into one (weights and BatchNorm
statistics; the run's EMA weights where it kept them):

    python average.py --ckpt_path=runs/<run> --last=3      (the 3 newest epoch checkpoints)
    python average.py --ckpt_path=runs/<run> --best=3 --file_name=avg.ckpt
    python validate.py --ckpt_path=runs/<run>/ckpt_0/<model>-avg-last3.ckpt
"""
from __future__ import annotations

import sys

from config import average_job, configure
from resgarden.base.runner import run


def _average(argv: list[str] | None) -> str:
    cfg = configure(argv, prog="average.py", description=__doc__)
    from resgarden.inference.averaging import average_checkpoints  # the engine after the device target is chosen

    return average_checkpoints(average_job(cfg))


def main(argv: list[str] | None = None) -> int:
    return run("average.py", lambda: _average(argv))


if __name__ == "__main__":
    sys.exit(main())
