"""How every command ends: logging set up, one-line errors for user mistakes, exit codes."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from resgarden.base.errors import EXIT_PREEMPTED, DistributedError, Preempted, StepCountError, UserError
from resgarden.base.logs import setup_logging
from resgarden.base.preemption import route_ctrl_c


def run(prog: str, action: Callable[[], str | None], on_interrupt: str = "interrupted") -> int:
    """Run ``action``; print what it returns. A user error is one line on stderr and exit code 2,
    a lost rank of a data-parallel job or a device that ran other steps than counted one line and
    exit code 1, a training stopped on request
    (checkpoint written) one line and EXIT_PREEMPTED, an immediate Ctrl-C exit code 130. Ctrl-C is
    routed before ``action`` imports MindSpore (preemption.route_ctrl_c)."""
    setup_logging()
    route_ctrl_c()
    try:
        message = action()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except StepCountError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except DistributedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        # MindSpore's teardown waits for the lost ranks (until its own watchdog SIGTERMs us): skip it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except Preempted as exc:
        if str(exc):
            print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"{prog}: {on_interrupt}", file=sys.stderr)
        return 130
    if message:
        print(message)
    return 0
