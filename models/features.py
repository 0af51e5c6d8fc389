"""Feature maps for dense tasks: which maps a trunk returns (``out_indices``, numbered as timm
numbers them) and what they are (:class:`FeatureInfo`), and fixing the first stages for
detection-style fine-tuning (``frozen_stages``)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mindspore import nn

NUM_MAPS = 5  # map 0 is the stem's (stride 2), maps 1-4 the stages' (strides 4-32)


@dataclass(frozen=True)
class FeatureMap:
    """One returned feature map: its channels, its stride from the input and the module giving it."""

    num_chs: int
    reduction: int
    module: str

    def __getitem__(self, key: str) -> int | str:  # timm-style ``info["num_chs"]``
        return getattr(self, key)


class FeatureInfo:
    """The maps a model returns, in order (timm's ``feature_info``): ``channels()``,
    ``reduction()``, ``module_name()``, or iterate over :class:`FeatureMap` entries."""

    def __init__(self, maps: Sequence[FeatureMap]) -> None:
        self.maps = tuple(maps)

    def channels(self) -> list[int]:
        return [m.num_chs for m in self.maps]

    def reduction(self) -> list[int]:
        return [m.reduction for m in self.maps]

    def module_name(self) -> list[str]:
        return [m.module for m in self.maps]

    def __iter__(self) -> Iterator[FeatureMap]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> FeatureMap:
        return self.maps[index]

    def __repr__(self) -> str:
        return f"FeatureInfo({list(self.maps)})"


def check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    """``out_indices`` as a sorted tuple of distinct map numbers in 0..4, or ValueError."""
    indices = tuple(sorted(set(int(i) for i in out_indices)))
    if not indices or indices[0] < 0 or indices[-1] >= NUM_MAPS:
        raise ValueError(f"out_indices must name maps 0 (stem, stride 2) to 4 (last stage, stride 32), "
                         f"got {tuple(out_indices)}")
    return indices


def check_frozen_stages(frozen_stages: int) -> int:
    """-1 (nothing fixed), 0 (the stem) or 1-4 (the stem and that many stages), or ValueError."""
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be -1 (none), 0 (stem) or 1-4 (stem and that many stages), "
                         f"got {frozen_stages}")
    return frozen_stages


def freeze(cells: Sequence[nn.Cell]) -> None:
    """Fix ``cells``: their parameters leave the trainable ones and their BatchNorms normalise with
    the running statistics, which stay as they are, in training too."""
    for cell in cells:
        for _, sub in cell.cells_and_names():
            if isinstance(sub, nn.BatchNorm2d):
                sub.use_batch_statistics = False
        for param in cell.get_parameters():
            param.requires_grad = False
