"""Classify image files with released or trained weights: top-5 class names and probabilities."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import mindspore as ms
import numpy as np

import models
from resgarden.base.errors import ConfigError, DataError
from resgarden.base.specs import InferenceJob
from resgarden.data.datasets import image_transform
from resgarden.data.images import UnreadableImage, read_rgb
from resgarden.inference.model_loading import build_inference_model, eval_transform, model_name, read_weights
from resgarden.runtime.context import set_context

CLASS_NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "imagenet_classes.tsv")


def imagenet_lemmas() -> dict[str, str]:
    """WordNet id -> readable name for the 1,000 ImageNet-1k classes."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t", 1) for line in handle if not line.startswith("#")]
    return dict(rows)


def predict(job: InferenceJob) -> list[dict[str, Any]]:
    """Top-5 (name, probability) for each of ``job.images``."""
    if not job.images:
        raise ConfigError("give the images to classify: --images a.jpg [b.jpg ...]")
    lemmas = imagenet_lemmas()
    set_context(job.context)
    checkpoint = read_weights(job)
    classes = (checkpoint.meta.get("classes") if checkpoint else None) or list(lemmas)
    names = [lemmas.get(c, c) for c in classes]
    model = build_inference_model(job, model_name(job, checkpoint), checkpoint, len(classes))
    loader = dataclasses.replace(job.loader, eval_transform=eval_transform(job, model))
    transform = image_transform(loader, training=False)
    results = []
    for path in job.images:
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
