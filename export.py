"""Export weights for deployment:

    python export.py --model=res2net50 --ckpt_path=runs/<run> --file_format=MINDIR [--dynamic_batch]
    python export.py --model=resnet50 --pretrained --file_format=ONNX --batch_size=1
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import parse_config  # noqa: E402
from resgarden.cli import run  # noqa: E402
from resgarden.export import export_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run("export.py", lambda: f"wrote {export_model(parse_config(argv, prog='export.py', description=__doc__))}")


if __name__ == "__main__":
    sys.exit(main())
