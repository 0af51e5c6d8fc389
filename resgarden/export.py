"""Export a model with its weights to MINDIR, ONNX or AIR for deployment."""
from __future__ import annotations

import logging
import os

import mindspore as ms
import numpy as np

from config import ConfigError
from models.conv import native_conv_disabled

from .context import set_context
from .inference import build_inference_model, resolve_weights

logger = logging.getLogger("resgarden")
EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}


def export_model(cfg) -> str:
    """Build the model with ``--pretrained`` or ``--ckpt_path`` weights and export it; return the path."""
    if cfg.dynamic_batch and cfg.file_format != "MINDIR":
        raise ConfigError("--dynamic_batch is supported for MINDIR only")
    set_context(cfg)
    state, meta, _ = resolve_weights(cfg)
    num_classes = cfg.num_classes or meta.get("num_classes") or (
        state["classifier.weight"].shape[0] if state is not None and "classifier.weight" in state else 1000)
    with native_conv_disabled():  # an exported graph must not name a library on this machine
        net = build_inference_model(cfg, num_classes, state)
    batch = None if cfg.dynamic_batch else cfg.batch_size
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    sample = ms.Tensor(shape=shape, dtype=ms.float32) if batch is None else ms.Tensor(np.zeros(shape, np.float32))
    path = cfg.file_name or f"{cfg.model}{EXTENSIONS[cfg.file_format]}"
    stem = path[: -len(EXTENSIONS[cfg.file_format])] if path.endswith(EXTENSIONS[cfg.file_format]) else path
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    try:
        ms.export(net, sample, file_name=stem, file_format=cfg.file_format)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{cfg.file_format} export of {cfg.model} failed: {str(exc).strip().splitlines()[0]}") from None
    written = stem + EXTENSIONS[cfg.file_format]
    logger.info("exported %s (%d classes, input %s) to %s", cfg.model, num_classes,
                ["N" if d is None else d for d in shape], written)
    return written
