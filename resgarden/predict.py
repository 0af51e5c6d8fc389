"""Classify image files with released or trained weights: top-5 class names and probabilities."""
from __future__ import annotations

import os
from typing import Any

import mindspore as ms
import numpy as np

from config import ConfigError

from .context import set_context
from .data import DataError, image_transform
from .images import UnreadableImage, read_rgb
from .inference import build_inference_model, resolve_weights

CLASS_NAMES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                                "imagenet_classes.tsv")


def imagenet_lemmas() -> dict[str, str]:
    """WordNet id -> readable name for the 1,000 ImageNet-1k classes."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t", 1) for line in handle if not line.startswith("#")]
    return dict(rows)


def predict(cfg) -> list[dict[str, Any]]:
    """Top-5 (name, probability) for each of ``cfg.images``."""
    if not cfg.images:
        raise ConfigError("give the images to classify: --images a.jpg [b.jpg ...]")
    lemmas = imagenet_lemmas()
    set_context(cfg)
    state, meta, _ = resolve_weights(cfg)
    classes = meta.get("classes") or list(lemmas)
    names = [lemmas.get(c, c) for c in classes]
    model = build_inference_model(cfg, len(classes), state)
    transform = image_transform(cfg, training=False)
    results = []
    for path in cfg.images:
        try:
            array = transform(read_rgb(path), rng=None)
        except UnreadableImage as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        logits = model(ms.Tensor(array[None].astype(np.float32))).asnumpy()[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: min(5, len(probs))]
        results.append(dict(image=path, top5=[(names[i], float(probs[i])) for i in top]))
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    """Each image path, then one line per class: probability and name."""
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {prob * 100:6.2f}%  {name}" for name, prob in result["top5"]]
    return "\n".join(lines)
