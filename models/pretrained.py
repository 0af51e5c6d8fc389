"""Released weights as data (URL, hash, accuracy, eval transform), and their safe download.

A :class:`Pretrained` is one set of released ImageNet weights, like a torchvision weights enum: where it
lives, the SHA-256 prefix in its file name (checked before use), its published accuracy and the
eval transform it was measured with. Models without released MindSpore weights keep their
published accuracy (paper, PaddleClas) with ``url=None``. Each variant's card
(:func:`models.registry.register_model`, in its family's file) carries its entry.
"""
from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import dataclass

from mindspore import nn

from resgarden.base.download import DownloadError, download_verified
from resgarden.base.specs import EvalTransform

from .weights import LoadReport, WeightsError, load_weights

logger = logging.getLogger("resgarden")

MINDCV_URL = "https://download.mindspore.cn/toolkits/mindcv/"
CACHE_ENV = "RESGARDEN_CACHE"


@dataclass(frozen=True)
class Pretrained:
    """One set of ImageNet weights and what was published about it."""

    top1: float
    top5: float | None
    source: str
    url: str | None = None
    recipe: str | None = None
    eval_transform: EvalTransform = EvalTransform()

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url or "").path)

    @property
    def sha256_prefix(self) -> str:
        """The hex digest prefix in the file name, as in ``res2net50-f42cf71b.ckpt``."""
        match = re.search(r"-([0-9a-f]{8,64})\.ckpt$", self.filename)
        if not match:
            raise WeightsError(f"weights URL {self.url} carries no SHA-256 prefix in its file name")
        return match.group(1)


def mindcv(path: str, top1: float, top5: float, recipe: str, **kwargs) -> Pretrained:
    """mindcv's released weights at ``MINDCV_URL + path``, trained with its ``configs/<recipe>``."""
    return Pretrained(top1, top5, "mindcv", url=MINDCV_URL + path,
                      recipe=f"https://github.com/mindspore-lab/mindcv/blob/main/configs/{recipe}", **kwargs)


def cache_dir(override: str | None = None) -> str:
    """Where downloaded weights live: ``override``, else $RESGARDEN_CACHE, else ~/.cache/resgarden."""
    return override or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "resgarden")


def load_pretrained(model: nn.Cell, name: str, entry: Pretrained | None, directory: str | None = None,
                    head: str = "replace") -> LoadReport:
    """Download (or reuse), verify and load ``name``'s released weights ``entry`` into ``model``
    (:func:`models.weights.load_weights` with the given head policy); logs and returns the report."""
    if entry is None or entry.url is None:
        source = f" (published top-1 {entry.top1} from {entry.source})" if entry else ""
        raise WeightsError(f"{name} has no released MindSpore weights{source}; train it, or load converted "
                           "weights with checkpoint_path=...")
    try:
        path = download_verified(entry.url, entry.sha256_prefix, cache_dir(directory))
    except DownloadError as exc:
        raise WeightsError(str(exc)) from None
    report = load_weights(model, path, head=head)
    logger.info("%s: loaded pretrained weights from %s: %s", name, entry.url, report.table())
    return report
