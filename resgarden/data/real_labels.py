"""ImageNet-ReaL: the reassessed labels of the ImageNet validation images (Beyer et al., 2020).

The labels file (``real.json``) holds one list of class indices per validation image, in the
order of the sorted file names (``ILSVRC2012_val_00000001.JPEG`` first); an empty list marks an
image that has no valid label and is left out of the ReaL accuracy.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from resgarden.base.errors import DataError
from resgarden.data.split import Split


def read_real_labels(path: str, split: Split, num_classes: int) -> list[tuple[int, ...]]:
    """The ReaL label set of every image of ``split``, in the split's order; DataError when the file
    does not fit the split (another count of images, not a list of label lists, labels out of range)."""
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except OSError as exc:
        raise DataError(f"--real_labels {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"--real_labels {path} is not JSON: {exc}") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and all(isinstance(x, int) and 0 <= x < num_classes for x in e) for e in entries):
        raise DataError(f"--real_labels {path}: expected a list of label lists (class indices 0..{num_classes - 1}), "
                        "one per validation image")
    if split.paths is None or len(entries) != len(split):
        raise DataError(f"--real_labels {path} labels {len(entries)} images, the split has {len(split)}: "
                        "ReaL labels the 50,000 ImageNet validation images")
    names = [os.path.basename(p) for p in split.paths]
    if len(set(names)) != len(names):
        raise DataError(f"--real_labels {path}: the split's file names are not unique, so they cannot be matched "
                        "to the labels file's order (sorted file names)")
    by_name = np.argsort(names, kind="stable")  # position k of the labels file is the k-th sorted name
    labels: list[tuple[int, ...]] = [()] * len(split)
    for position, index in enumerate(by_name):
        labels[int(index)] = tuple(entries[position])
    return labels


def real_hits(top5: np.ndarray, label_sets: Sequence[tuple[int, ...]]) -> tuple[int, int, int]:
    """(images with ReaL labels, top-1 hits, top-5 hits) of one batch of top-5 predictions: a hit is
    a prediction among the image's labels."""
    count = hits1 = hits5 = 0
    for predicted, wanted in zip(top5, label_sets):
        if wanted:
            count += 1
            hits1 += int(predicted[0] in wanted)
            hits5 += int(any(p in wanted for p in predicted[:5]))
    return count, hits1, hits5
