"""Export weights for deployment:

    python export.py --ckpt_path=runs/<run> --file_format=ONNX --verify     (batch dimension open)
    python export.py --model=resnet50 --pretrained --file_format=MINDIR --dynamic_batch=False --batch_size=1
"""
from __future__ import annotations

import sys

from config import configure, inference_job
from resgarden.base.runner import run


def _export(argv: list[str] | None) -> str:
    cfg = configure(argv, prog="export.py", description=__doc__)
    from resgarden.inference.export import export_model  # the engine after the device target is chosen

    return export_model(inference_job(cfg))


def main(argv: list[str] | None = None) -> int:
    return run("export.py", lambda: _export(argv))


if __name__ == "__main__":
    sys.exit(main())
