"""One split of a data set: image files or decoded images, their labels and the class names."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """Image files (paths) or decoded images (arrays), labels and class names."""

    classes: list[str]
    labels: np.ndarray
    paths: list[str] | None = None
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 when in memory

    def __len__(self) -> int:
        return len(self.labels)
