"""Score a checkpoint or released weights on a data split: the engine of validate.py and eval.py."""
from __future__ import annotations

import json
import logging
import os
from typing import Any


import models
from config import ConfigError
from models.pretrained import PRETRAINED
from models.weights import adapt_head, load_weights, read_checkpoint

from .checkpoint import find_checkpoint, read_meta
from .data import ensure_digits, imagenet_root, load_cifar10_split, load_imagenet_split, resolve_dataset
from .evaluate import evaluate
from .trainer import set_context

logger = logging.getLogger("resgarden")


def _eval_split(cfg):
    dataset = resolve_dataset(cfg)
    if dataset == "cifar10":
        return load_cifar10_split(cfg.data_dir or "./data/cifar10", False, cfg.dataset_download)
    if dataset == "digits":
        return load_imagenet_split(ensure_digits(cfg.data_dir or "./data/digits"), cfg.val_split)
    return load_imagenet_split(imagenet_root(cfg), cfg.val_split)


def apply_weights_transform(cfg, meta: dict[str, Any]) -> None:
    """Use the eval transform the weights were published or trained with (released weights'
    table entry, or a run checkpoint's metadata) for every setting the user did not give."""
    transform: dict[str, Any] = {}
    if cfg.pretrained and cfg.model in PRETRAINED:
        entry = PRETRAINED[cfg.model]
        transform = dict(image_size=entry.image_size, crop_pct=entry.crop_pct, interpolation=entry.interpolation,
                         mean=list(entry.mean), std=list(entry.std))
    transform.update(meta.get("eval_transform", {}))
    for key, value in transform.items():
        if key not in cfg.explicit:
            setattr(cfg, key, value)


def validate(cfg) -> dict[str, Any]:
    """Top-1/top-5/loss/count/img/s of ``--pretrained`` weights or ``--ckpt_path`` on the eval split."""
    if cfg.pretrained == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of --pretrained or --ckpt_path (a file or a run folder)")
    set_context(cfg)
    state, meta, source = None, {}, "pretrained"
    if cfg.ckpt_path:
        source = find_checkpoint(cfg.ckpt_path, prefer_best=True)
        state = dict(read_checkpoint(source))
        meta = read_meta(state)
        if meta.get("model") and "model" not in cfg.explicit:
            cfg.model = meta["model"]
    try:
        models.check_model_name(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    apply_weights_transform(cfg, meta)
    split = _eval_split(cfg)
    if meta.get("classes") and meta["classes"] != split.classes:
        raise ConfigError(f"{source} was trained on other classes than the {cfg.val_split} split here")
    num_classes = cfg.num_classes or meta.get("num_classes") or (1000 if cfg.pretrained else len(split.classes))
    if int(split.labels.max()) >= num_classes:
        raise ConfigError(f"the data has labels up to {int(split.labels.max())} but the model has {num_classes} classes")
    model = models.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                in_channels=cfg.in_channels)
    if state is not None:
        state = {k: v for k, v in state.items()}
        replaced = adapt_head(state, model)
        if replaced:
            raise ConfigError(f"{source} has a classifier for another number of classes than {num_classes}")
        load_weights(model, state)
    logger.info("validating %s (%s) on %d images, %d px, crop %.3f", cfg.model, source, len(split),
                cfg.image_size, cfg.crop_pct)
    result = dict(model=cfg.model, weights=source, **evaluate(model, split, cfg))
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


def format_result(result: dict[str, Any]) -> str:
    return (f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}  images {result['count']}  {result['img_s']:.1f} img/s")


