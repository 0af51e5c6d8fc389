"""Classify images and print the top-5 classes:

    python infer.py --model=resnet50 --pretrained --images cat.jpg dog.jpg
    python infer.py --ckpt_path=runs/<run> --images digit.png
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import ConfigError, parse_config  # noqa: E402
from models.weights import WeightsError  # noqa: E402
from resgarden.data import DataError  # noqa: E402
from resgarden.download import DownloadError  # noqa: E402
from resgarden.predict import predict  # noqa: E402
from resgarden.trainer import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        results = predict(parse_config(argv, prog="infer.py", description=__doc__))
    except (ConfigError, DataError, WeightsError, DownloadError) as exc:
        print(f"infer.py: error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(result["image"])
        for name, prob in result["top5"]:
            print(f"  {prob * 100:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
