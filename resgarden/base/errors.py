"""Error types every layer raises and the entry points report: a leaf module, importing nothing."""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix (a flag, a file, the data, the network); the message is meant
    for the user as is and the entry points print it as one line (exit code 2)."""


class DataError(UserError):
    """Missing or malformed data; the message is for the user as is."""


class DistributedError(RuntimeError):
    """A data-parallel job cannot go on: a rank died, stopped answering or could not join
    (one line, exit code 1)."""


class StepCountError(RuntimeError):
    """The device ran another number of optimizer steps than the training loop counted (a sink call
    that ran fewer steps than its sink size): LR, checkpoints and the resume point would be wrong
    from here on, so the run stops (one line, exit code 1)."""


class ConfigError(UserError):
    """A bad flag, YAML key or value, or settings that do not go together."""


class ExportMismatch(UserError):
    """An exported file's outputs differ from the model's (``export.py --verify``)."""


class WriteError(UserError):
    """A file or folder cannot be written (disk full, read-only, permissions); names the path."""

    def __init__(self, path: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(f"cannot write {path}: {reason}")


class Preempted(Exception):
    """Training stopped on request (SIGTERM, SIGUSR1, Ctrl-C) after writing a checkpoint to resume
    from; the message (empty on ranks > 0) says how. Exit code EXIT_PREEMPTED."""


EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, to be retried (resumed)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite; the message names the step, the LR and what to try."""
