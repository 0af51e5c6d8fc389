"""``export.py --verify``: run an exported file in its runtime (ONNX in onnxruntime, MINDIR in
MindSpore) on a batch of images and compare its outputs with the checkpoint's own."""
from __future__ import annotations

import dataclasses
import logging

import mindspore as ms
import numpy as np

from models.checkpoint import Checkpoint
from resgarden.base.errors import ConfigError, ExportMismatch
from resgarden.base.specs import InferenceJob
from resgarden.data.datasets import image_transform, load_eval_split
from resgarden.inference.model_loading import build_inference_model, eval_transform

logger = logging.getLogger("resgarden")
TOLERANCE = 1e-4  # largest difference allowed, relative to the largest reference logit


def check_export(job: InferenceJob, path: str, name: str, checkpoint: Checkpoint | None, num_classes: int) -> str:
    """A line with the largest difference between the exported file's outputs and the model's (no
    BatchNorm folding, MindSpore on this machine) on ``--batch_size`` images of the val split when
    a data set is given, else random ones; and on a single image when the batch is open.
    ExportMismatch above TOLERANCE. The format is checked first (:func:`check_verifiable`)."""
    unfolded = dataclasses.replace(job, weights=dataclasses.replace(job.weights, fold_bn=False))
    model = build_inference_model(unfolded, name, checkpoint, num_classes)
    images, source = _sample_batch(job, model)
    want = model(ms.Tensor(images)).asnumpy()
    run = _runner(job.file_format, path)
    batches = [(images, want)] + ([(images[:1], want[:1])] if job.dynamic_batch and len(images) > 1 else [])
    worst = 0.0
    for batch, reference in batches:
        got = run(batch)
        if got.shape != reference.shape:
            raise ExportMismatch(f"{path}: outputs of shape {list(got.shape)} for {len(batch)} images, "
                                 f"expected {list(reference.shape)}")
        worst = max(worst, float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-12)))
    runtime = "onnxruntime" if job.file_format == "ONNX" else "MindSpore"
    sizes = " and ".join(str(len(b)) for b, _ in batches)
    line = (f"verify: {path} in {runtime} on {sizes} {source} image(s): largest difference {worst:.2e} "
            f"of the largest logit (limit {TOLERANCE:g})")
    if not worst <= TOLERANCE:
        raise ExportMismatch(line + ": the exported model computes something else")
    return line


def check_verifiable(file_format: str) -> None:
    """ConfigError unless ``--verify`` can run files of ``file_format`` here."""
    if file_format not in ("ONNX", "MINDIR"):
        raise ConfigError(f"--verify runs ONNX and MINDIR files; {file_format} runs on Ascend only")


def _sample_batch(job: InferenceJob, model) -> tuple[np.ndarray, str]:
    """``--batch_size`` images through the model's eval transform: the val split's first ones when a
    data set is named, else random normal pixels."""
    transform = eval_transform(job, model)
    shape = (job.loader.batch_size, job.model.in_channels, transform.image_size, transform.image_size)
    if job.data.dataset == "auto" and not job.data.data_dir:
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32), "random"
    split = load_eval_split(job.data)
    prepare = image_transform(dataclasses.replace(job.loader, eval_transform=transform), training=False)
    arrays = []
    for index in range(min(job.loader.batch_size, len(split))):
        if split.images is not None:
            raw = split.images[index]
        else:
            with open(split.paths[index], "rb") as handle:
                raw = handle.read()
        arrays.append(prepare(raw, rng=None))
    return np.stack(arrays).astype(np.float32), f"{job.data.val_split}-split"


def _runner(file_format: str, path: str):
    """A function running a batch (N, C, H, W) through the exported file."""
    if file_format == "ONNX":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {input_name: batch})[0]
    graph = ms.nn.GraphCell(ms.load(path))
    return lambda batch: graph(ms.Tensor(batch)).asnumpy()
