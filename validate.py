"""Score released or trained weights: top-1, top-5, mean loss, image count and throughput.

    python validate.py --model=res2net50 --dataset=imagenet --data_dir=/imagenet --val_split=val --pretrained
    python validate.py --dataset=imagenet --data_dir=/imagenet --ckpt_path=./runs/<run>   (best, else latest)
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import parse_config  # noqa: E402
from resgarden.cli import run  # noqa: E402
from resgarden.validation import format_result, validate  # noqa: E402


def main(argv: list[str] | None = None, prog: str = "validate.py") -> int:
    return run(prog, lambda: format_result(validate(parse_config(argv, prog=prog, description=__doc__))))


if __name__ == "__main__":
    sys.exit(main())
