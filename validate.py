"""Score released or trained weights: top-1, top-5, mean loss, image count and throughput.

    python validate.py --model=res2net50 --dataset=imagenet --data_dir=/imagenet --val_split=val --pretrained
    python validate.py --dataset=imagenet --data_dir=/imagenet --ckpt_path=./runs/<run>   (best, else latest)
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import ConfigError, parse_config  # noqa: E402
from models.weights import WeightsError  # noqa: E402
from resgarden.data import DataError  # noqa: E402
from resgarden.download import DownloadError  # noqa: E402
from resgarden.trainer import setup_logging  # noqa: E402
from resgarden.validation import format_result, validate  # noqa: E402


def main(argv: list[str] | None = None, prog: str = "validate.py") -> int:
    setup_logging()
    try:
        result = validate(parse_config(argv, prog=prog, description=__doc__))
    except (ConfigError, DataError, WeightsError, DownloadError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
