"""Stop requests from whoever runs the job: SIGTERM (Slurm, Kubernetes and mpirun send it before
they kill a job), SIGUSR1 (a scheduler's advance warning) and Ctrl-C. The training loop finishes
the step it is in, writes a checkpoint at that step and exits; a second Ctrl-C stops at once."""
from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger("resgarden")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_AT_ONCE_PRESSES = 3  # Ctrl-C pressed this often while the main thread is busy in MindSpore


def route_ctrl_c() -> bool:
    """Make Ctrl-C reach Python's SIGINT handler as SIGINT. Around each graph call MindSpore installs
    a SIGINT handler that sends this process SIGTERM (SignalGuard, libmindspore_ms_backend), so a
    Ctrl-C mid-step would read as SIGTERM. Called before MindSpore starts its threads (they inherit
    the signal mask), this blocks SIGINT in every thread but one watcher, which takes it with
    sigwait and hands it to the main thread as the interpreter would; the third press exits at
    once (a long graph compile does not return to Python). Forked data workers keep SIGINT blocked:
    their parent decides. False, and nothing changed, once MindSpore is imported."""
    if ("mindspore" in sys.modules or not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=_forward_ctrl_c, name="resgarden-ctrl-c", daemon=True).start()
    return True


def _forward_ctrl_c() -> None:
    presses = 0
    while True:
        signal.sigwait({signal.SIGINT})
        presses += 1
        if presses >= EXIT_AT_ONCE_PRESSES:
            os.write(2, b"Ctrl-C pressed three times: exiting now, without a checkpoint\n")
            os._exit(130)
        _thread.interrupt_main(signal.SIGINT)


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
        self.signal_name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
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
