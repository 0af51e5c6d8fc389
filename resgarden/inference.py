"""What validate, eval, infer and export share: which weights, which model, which eval transform."""
from __future__ import annotations

import logging
from typing import Any

from mindspore import nn

import models
from config import ConfigError
from models.fold import fold_batchnorm
from models.pretrained import PRETRAINED
from models.weights import adapt_head, load_weights

from .checkpoint import read_run_weights
from .context import check_model

logger = logging.getLogger("resgarden")


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


def resolve_weights(cfg) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """(weights or None for --pretrained, run metadata, source) from exactly one of --pretrained or
    --ckpt_path. A run checkpoint also supplies the model name and eval transform unless given.
    Call after :func:`resgarden.context.set_context` (and, in a data-parallel job, ``init_cluster``):
    reading a checkpoint creates Parameters."""
    if cfg.pretrained == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of --pretrained or --ckpt_path (a file or a run folder)")
    state, meta, source = None, {}, "pretrained"
    if cfg.ckpt_path:
        state, meta, source = read_run_weights(cfg.ckpt_path)
        if meta.get("model") and "model" not in cfg.explicit:
            cfg.model = meta["model"]
    check_model(cfg)
    apply_weights_transform(cfg, meta)
    return state, meta, source


def build_inference_model(cfg, num_classes: int, state: dict[str, Any] | None) -> nn.Cell:
    """The model in eval mode with the released weights or ``state`` (whose head must fit)."""
    model = models.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                in_channels=cfg.in_channels)
    if state is not None:
        state = dict(state)
        if adapt_head(state, model):
            raise ConfigError(f"the checkpoint's classifier does not have {num_classes} classes")
        load_weights(model, state)
    model.set_train(False)
    if cfg.fold_bn:
        logger.debug("folded %d BatchNorm layers into their convolutions (--fold_bn=False keeps them)",
                    fold_batchnorm(model))
    return model
