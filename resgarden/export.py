"""Export a model with its weights to MINDIR, ONNX or AIR for deployment."""
from __future__ import annotations

import logging

import mindspore as ms
import numpy as np

from models.conv import native_conv_disabled

from .atomic import atomic_path
from .context import set_context
from .errors import ConfigError
from .model_loading import build_inference_model, checkpoint_classes, eval_transform, model_name, read_weights
from .specs import InferenceJob

logger = logging.getLogger("resgarden")
EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}


def export_model(job: InferenceJob) -> str:
    """Build the model with ``--pretrained`` or ``--ckpt_path`` weights and export it; return the path."""
    if job.dynamic_batch and job.file_format != "MINDIR":
        raise ConfigError("--dynamic_batch is supported for MINDIR only")
    set_context(job.context)
    checkpoint = read_weights(job)
    num_classes = checkpoint_classes(job, checkpoint) or 1000
    name, extension = model_name(job, checkpoint), EXTENSIONS[job.file_format]
    with native_conv_disabled():  # an exported graph must not name a library on this machine
        net = build_inference_model(job, name, checkpoint, num_classes)
    size = eval_transform(job, net).image_size
    batch = None if job.dynamic_batch else job.loader.batch_size
    shape = (batch, job.model.in_channels, size, size)
    sample = ms.Tensor(shape=shape, dtype=ms.float32) if batch is None else ms.Tensor(np.zeros(shape, np.float32))
    path = job.file_name or f"{name}{extension}"
    written = path if path.endswith(extension) else path + extension
    with atomic_path(written, suffix=extension) as tmp:  # MindSpore appends the extension itself
        try:
            ms.export(net, sample, file_name=tmp[: -len(extension)], file_format=job.file_format)
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{job.file_format} export of {name} failed: {first}") from None
    logger.info("exported %s (%d classes, input %s) to %s", name, num_classes,
                ["N" if d is None else d for d in shape], written)
    return written
