"""Stop requests from whoever runs the job: SIGTERM (Slurm, Kubernetes and mpirun send it before
they kill a job), SIGUSR1 (a scheduler's advance warning) and Ctrl-C. The training loop finishes
the step it is in, writes a checkpoint at that step and exits; a second Ctrl-C stops at once."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger("resgarden")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Set by the first stop signal this process receives."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a forked data worker: its parent decides
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then writing a checkpoint to resume from", self.signal_name)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """A StopRequest set by STOP_SIGNALS while the block runs (handlers installed from the main
    thread only; the previous ones come back afterwards)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {number: signal.signal(number, stop.handle) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
