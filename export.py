"""Export weights for deployment:

    python export.py --model=res2net50 --ckpt_path=runs/<run> --file_format=MINDIR [--dynamic_batch]
    python export.py --model=resnet50 --pretrained --file_format=ONNX --batch_size=1
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import ConfigError, parse_config  # noqa: E402
from models.weights import WeightsError  # noqa: E402
from resgarden.download import DownloadError  # noqa: E402
from resgarden.export import export_model  # noqa: E402
from resgarden.trainer import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        path = export_model(parse_config(argv, prog="export.py", description=__doc__))
    except (ConfigError, WeightsError, DownloadError) as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
