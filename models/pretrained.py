"""Released weights as data (URL, hash, accuracy, eval transform), and their safe download.

Each entry is one set of released ImageNet weights, like a torchvision weights enum: where it
lives, the SHA-256 prefix in its file name (checked before use), its published accuracy and the
eval transform it was measured with. Models without released MindSpore weights keep their
published accuracy (paper, PaddleClas) with ``url=None``.
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


def _mindcv(path: str, top1: float, top5: float, recipe: str, **kwargs) -> Pretrained:
    return Pretrained(top1, top5, "mindcv", url=MINDCV_URL + path,
                      recipe=f"https://github.com/mindspore-lab/mindcv/blob/main/configs/{recipe}", **kwargs)


PRETRAINED: dict[str, Pretrained] = {
    "resnet18": _mindcv("resnet/resnet18-1e65cd21.ckpt", 70.21, 89.62, "resnet/resnet_18_ascend.yaml"),
    "resnet34": _mindcv("resnet/resnet34-f297d27e.ckpt", 74.15, 91.98, "resnet/resnet_34_ascend.yaml"),
    "resnet50": _mindcv("resnet/resnet50-e0733ab8.ckpt", 76.69, 93.50, "resnet/resnet_50_ascend.yaml"),
    "resnet101": _mindcv("resnet/resnet101-689c5e77.ckpt", 78.24, 94.09, "resnet/resnet_101_ascend.yaml"),
    "resnet152": _mindcv("resnet/resnet152-beb689d8.ckpt", 78.72, 94.45, "resnet/resnet_152_ascend.yaml"),
    "resnext50_32x4d": _mindcv("resnext/resnext50_32x4d-af8aba16.ckpt", 78.53, 94.10,
                               "resnext/resnext50_32x4d_ascend.yaml"),
    "resnext101_32x4d": _mindcv("resnext/resnext101_32x4d-3c1e9c51.ckpt", 79.83, 94.80,
                                "resnext/resnext101_32x4d_ascend.yaml"),
    "resnext101_64x4d": _mindcv("resnext/resnext101_64x4d-8929255b.ckpt", 80.30, 94.82,
                                "resnext/resnext101_64x4d_ascend.yaml"),
    "res2net50": _mindcv("res2net/res2net50-f42cf71b.ckpt", 79.35, 94.64, "res2net/res2net_50_ascend.yaml"),
    "res2net101": _mindcv("res2net/res2net101-8ae60132.ckpt", 79.56, 94.70, "res2net/res2net_101_ascend.yaml"),
    "res2net50_v1b": _mindcv("res2net/res2net50_v1b-99304e92.ckpt", 80.32, 95.09,
                             "res2net/res2net_50_v1b_ascend.yaml"),
    "res2net101_v1b": _mindcv("res2net/res2net101_v1b-7e6db001.ckpt", 81.14, 95.41,
                              "res2net/res2net_101_v1b_ascend.yaml"),
    "resnest50": _mindcv("resnest/resnest50-f2e7fc9c.ckpt", 80.81, 95.16, "resnest/resnest50_ascend.yaml"),
    "resnest101": _mindcv("resnest/resnest101-7cc5c258.ckpt", 82.90, 96.12, "resnest/resnest101_ascend.yaml",
                          eval_transform=EvalTransform(image_size=256, crop_pct=0.9)),
    # No released MindSpore weights: accuracy as published (Res2Net paper / PaddleClas).
    "res2net50_14w_8s": Pretrained(79.5, 94.7, "PaddleClas"),
    "res2net50_48w_2s": Pretrained(77.32, 93.53, "paper"),
    "res2net50_26w_6s": Pretrained(78.58, 94.13, "paper"),
    "res2net50_26w_8s": Pretrained(79.20, 94.37, "paper"),
}


def published_top1(name: str) -> tuple[float, str] | None:
    """(top-1 %, source) as published for ``name``, if known."""
    entry = PRETRAINED.get(name)
    return (entry.top1, entry.source) if entry else None


def cache_dir(override: str | None = None) -> str:
    """Where downloaded weights live: ``override``, else $RESGARDEN_CACHE, else ~/.cache/resgarden."""
    return override or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "resgarden")


def load_pretrained(model: nn.Cell, name: str, directory: str | None = None, head: str = "replace") -> LoadReport:
    """Download (or reuse), verify and load the released weights of ``name`` into ``model``
    (:func:`models.weights.load_weights` with the given head policy); logs and returns the report."""
    entry = PRETRAINED.get(name)
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
