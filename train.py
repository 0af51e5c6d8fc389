"""Train a ResNet-family model: `python train.py -c configs/<family>/<recipe>.yaml [--flag=value ...]`.

Settings, their defaults and both flag dialects are listed by `python train.py --help`.
"""
from __future__ import annotations

import sys

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

from config import ConfigError, parse_config  # noqa: E402
from models.weights import WeightsError  # noqa: E402
from resgarden.data import DataError  # noqa: E402
from resgarden.download import DownloadError  # noqa: E402
from resgarden.trainer import setup_logging, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse_config(argv, prog="train.py", description=__doc__)
        result = train(cfg)
    except (ConfigError, DataError, WeightsError, DownloadError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; resume with --resume=<run folder>", file=sys.stderr)
        return 130
    accuracy = f", val top-1 {result['val_top1']:.2f}%" if "val_top1" in result else ""
    print(f"done: {result['epoch']} epochs, train loss {result['train_loss']:.4f}{accuracy}; run folder "
          f"{result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
