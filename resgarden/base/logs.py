"""The project's one logger, set up once per process by every entry point."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("resgarden")


def setup_logging(log_file: str | None = None, quiet: bool = False) -> None:
    """INFO to stdout, and to ``log_file`` when given (once per process); ``quiet`` (ranks > 0 of a
    data-parallel job): warnings and errors only."""
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    for stale in [h for h in consoles if h.stream is not sys.stdout]:  # sys.stdout was replaced since
        logger.removeHandler(stale)
    if not any(h.stream is sys.stdout for h in consoles):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    if log_file:  # one run's log file at a time, also when train() is called again in-process
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
            old.close()
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
