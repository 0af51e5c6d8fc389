"""Classify image files with released or trained weights: top-5 class names and probabilities."""
from __future__ import annotations

import os
from typing import Any

import mindspore as ms
import numpy as np
from PIL import Image

import models
from config import ConfigError
from models.weights import adapt_head, load_weights, read_checkpoint

from .checkpoint import find_checkpoint, read_meta
from .data import DataError, transforms
from .trainer import set_context
from .validation import apply_weights_transform

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
    if cfg.pretrained == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of --pretrained or --ckpt_path")
    set_context(cfg)
    lemmas = imagenet_lemmas()
    state, meta = None, {}
    if cfg.ckpt_path:
        state = dict(read_checkpoint(find_checkpoint(cfg.ckpt_path, prefer_best=True)))
        meta = read_meta(state)
        if meta.get("model") and "model" not in cfg.explicit:
            cfg.model = meta["model"]
    try:
        models.check_model_name(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    apply_weights_transform(cfg, meta)
    classes = meta.get("classes") or list(lemmas)
    names = [lemmas.get(c, c) for c in classes]
    model = models.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=len(classes),
                                in_channels=cfg.in_channels)
    if state is not None:
        if adapt_head(state, model):
            raise ConfigError("the checkpoint's classifier does not match its class list")
        load_weights(model, state)
    model.set_train(False)
    pipeline = transforms(cfg, training=False)
    results = []
    for path in cfg.images:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        for op in pipeline:
            array = op(array)
        logits = model(ms.Tensor(array[None].astype(np.float32))).asnumpy()[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: min(5, len(probs))]
        results.append(dict(image=path, top5=[(names[i], float(probs[i])) for i in top]))
    return results
