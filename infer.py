"""Classify images and print the top-5 classes:

    python infer.py --model=resnet50 --pretrained --images cat.jpg dog.jpg
    python infer.py --ckpt_path=runs/<run> --images digit.png
    python infer.py --model=resnet50 --pretrained --images photos/ --predictions=photos.csv
"""
from __future__ import annotations

import sys

from config import configure, inference_job
from resgarden.base.runner import run


def _infer(argv: list[str] | None) -> str:
    cfg = configure(argv, prog="infer.py", description=__doc__)
    from resgarden.inference.predict import format_predictions, predict  # the engine after the device target is chosen

    job = inference_job(cfg)
    return format_predictions(predict(job), written_to=job.predictions)


def main(argv: list[str] | None = None) -> int:
    return run("infer.py", lambda: _infer(argv))


if __name__ == "__main__":
    sys.exit(main())
