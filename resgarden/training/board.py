"""TensorBoard event files of a training run (``<run>/tensorboard/``, written by rank 0 with
tensorboardX, which needs neither TensorFlow nor PyTorch): the training loss, LR, loss scale,
skipped steps and img/s at every log point, validation top-1 / top-5 / loss and the epoch's mean
training loss per epoch, and the run's settings as text. Steps are global micro-steps, so a resumed
run continues its curves: the writer purges what an interrupted run logged after the checkpoint
it resumes from."""
from __future__ import annotations

import os
from collections.abc import Mapping

FOLDER = "tensorboard"


class Board:
    """Scalars and text for TensorBoard; inert when ``run_dir`` is None (other ranks, switched off)."""

    def __init__(self, run_dir: str | None, start_step: int = 0) -> None:
        self._writer = None
        if run_dir is not None:
            from tensorboardX import SummaryWriter

            # purge_step: what an interrupted run logged after its checkpoint's step is hidden on reading
            self._writer = SummaryWriter(os.path.join(run_dir, FOLDER), purge_step=start_step + 1 if start_step else None,
                                         flush_secs=30)

    @property
    def folder(self) -> str | None:
        return self._writer.logdir if self._writer else None

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """One point per tag, e.g. ``{"train/loss": 0.7}``; None values are left out."""
        if self._writer:
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None
