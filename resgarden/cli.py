"""How every entry point runs: the config and the platform first, then logging, one-line errors for
user mistakes, exit codes. Imports no engine module, so that the device target is chosen before the
models (and their CPU kernels) are imported."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Callable

from config import parse_config

from .errors import DistributedError, UserError
from .logs import setup_logging
from .platform import select_device_target


def configure(argv: Sequence[str] | None, prog: str, description: str | None) -> argparse.Namespace:
    """The merged settings, with ``device_target`` resolved (``auto`` -> what this MindSpore can run
    on) and the CPU speed guard applied for it: call before importing the engine or the models."""
    cfg = parse_config(argv, prog=prog, description=description)
    cfg.device_target = select_device_target(cfg.device_target)
    return cfg


def run(prog: str, action: Callable[[], str | None], on_interrupt: str = "interrupted") -> int:
    """Run ``action``; print what it returns. A user error is one line on stderr and exit code 2,
    a lost rank of a data-parallel job one line and exit code 1, Ctrl-C exit code 130."""
    setup_logging()
    try:
        message = action()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        # MindSpore's teardown waits for the lost ranks (until its own watchdog SIGTERMs us): skip it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: {on_interrupt}", file=sys.stderr)
        return 130
    if message:
        print(message)
    return 0
