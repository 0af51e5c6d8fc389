"""Score released or trained weights: top-1, top-5, mean loss, image count and throughput.

    python validate.py --model=res2net50 --dataset=imagenet --data_dir=/imagenet --val_split=val --pretrained
    python validate.py --dataset=imagenet --data_dir=/imagenet --ckpt_path=./runs/<run>   (best, else latest)
    python validate.py --model='res2net*' --pretrained --data_dir=/imagenet --results_csv=res2net.csv
"""
from __future__ import annotations

import sys

from config import ConfigError, configure, inference_job
from resgarden.base.runner import run


def _validate(argv: list[str] | None, prog: str) -> str | None:
    cfg = configure(argv, prog=prog, description=__doc__)
    from resgarden.inference.validation import format_result, validate_models  # the engine after the device target

    results, failed = validate_models(inference_job(cfg))
    text = "\n".join(line for line in map(format_result, results) if line) or None
    if failed:
        if text:
            print(text, flush=True)
        raise ConfigError(f"{len(failed)} of {len(results) + len(failed)} models failed: " + "; ".join(failed))
    return text


def main(argv: list[str] | None = None, prog: str = "validate.py") -> int:
    return run(prog, lambda: _validate(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
