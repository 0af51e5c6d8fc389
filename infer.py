"""Classify images and print the top-5 classes:

    python infer.py --model=resnet50 --pretrained --images cat.jpg dog.jpg
    python infer.py --ckpt_path=runs/<run> --images digit.png
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import parse_config  # noqa: E402
from resgarden.cli import run  # noqa: E402
from resgarden.predict import format_predictions, predict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run("infer.py", lambda: format_predictions(predict(parse_config(argv, prog="infer.py",
                                                                           description=__doc__))))


if __name__ == "__main__":
    sys.exit(main())
