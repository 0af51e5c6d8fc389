"""Export a model with its weights to MINDIR, ONNX or AIR for deployment; the batch dimension is
left open (MINDIR, ONNX) unless ``--dynamic_batch=False``."""
from __future__ import annotations

import logging

import mindspore as ms
import numpy as np

from models.layers import portable_build
from resgarden.base.atomic import atomic_path
from resgarden.base.errors import ConfigError
from resgarden.base.specs import InferenceJob
from resgarden.inference.export_check import check_export, check_verifiable
from resgarden.inference.model_loading import (
    build_inference_model,
    checkpoint_classes,
    eval_transform,
    model_name,
    read_weights,
)
from resgarden.runtime.context import set_context

logger = logging.getLogger("resgarden")
EXTENSIONS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
DYNAMIC_FORMATS = ("MINDIR", "ONNX")
BATCH_NAME = "N"  # the ONNX graph's symbolic batch dimension
_ONNX_TRACE_BATCH = 2  # ONNX is traced at a fixed batch, then its batch dimension is opened


def export_model(job: InferenceJob) -> str:
    """Build the model with ``--pretrained`` or ``--ckpt_path`` weights and export it; with
    ``--verify`` run the written file and compare its outputs with the model's. Returns a line
    for the user."""
    if job.verify:
        check_verifiable(job.file_format)  # before any weights are read or a graph is written
    set_context(job.context)
    checkpoint = read_weights(job)
    num_classes = checkpoint_classes(job, checkpoint) or 1000
    name, extension = model_name(job, checkpoint), EXTENSIONS[job.file_format]
    dynamic = job.dynamic_batch and job.file_format in DYNAMIC_FORMATS
    if job.dynamic_batch and not dynamic:
        logger.info("%s takes a fixed batch: exporting with batch %d", job.file_format, job.loader.batch_size)
    with portable_build():  # an exported graph must not name a library on this machine
        net = build_inference_model(job, name, checkpoint, num_classes)
    size = eval_transform(job, net).image_size
    channels = job.model.in_channels
    path = job.file_name or f"{name}{extension}"
    written = path if path.endswith(extension) else path + extension
    with atomic_path(written, suffix=extension) as tmp:  # MindSpore appends the extension itself
        _export(net, name, job.file_format, tmp[: -len(extension)], channels, size,
                None if dynamic else job.loader.batch_size)
        if dynamic and job.file_format == "ONNX":
            open_onnx_batch(tmp, _ONNX_TRACE_BATCH)
    shape = ["N" if dynamic else job.loader.batch_size, channels, size, size]
    logger.info("exported %s (%d classes, input %s) to %s", name, num_classes, shape, written)
    line = f"wrote {written} (input {'x'.join(str(d) for d in shape)})"
    if job.verify:
        line += "\n" + check_export(job, written, name, checkpoint, num_classes)
    return line


def _export(net, name: str, file_format: str, stem: str, channels: int, size: int, batch: int | None) -> None:
    if batch is None and file_format == "MINDIR":
        sample = ms.Tensor(shape=(None, channels, size, size), dtype=ms.float32)
    else:
        sample = ms.Tensor(np.zeros((batch or _ONNX_TRACE_BATCH, channels, size, size), np.float32))
    try:
        ms.export(net, sample, file_name=stem, file_format=file_format)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{file_format} export of {name} failed: {first}") from None


def open_onnx_batch(path: str, traced_batch: int) -> None:
    """Make the batch dimension of the ONNX graph at ``path`` symbolic (``N``): MindSpore exports
    ONNX at a fixed shape only. The models compute without batch-sized constants (their reshapes
    keep the batch at -1, their pads are Pad operators), so opening the graph's inputs and outputs
    and dropping the traced intermediate shapes is enough; ConfigError if a constant still holds
    the traced batch as its leading dimension."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    fixed = [t.name for t in graph.initializer if len(t.dims) == 4 and t.dims[0] == traced_batch]
    if fixed:
        raise ConfigError(f"the exported ONNX graph holds constants of the traced batch ({fixed[0]}): "
                          "export with --dynamic_batch=False")
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == traced_batch:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = BATCH_NAME
    del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, path)
