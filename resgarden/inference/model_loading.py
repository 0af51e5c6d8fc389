"""What validate, eval, infer and export share: which weights, which model, which eval transform."""
from __future__ import annotations

import dataclasses
import logging
import os

from mindspore import nn

import models
from models.checkpoint import Checkpoint, open_run_checkpoint
from models.fold import fold_batchnorm
from models.profile import count_params
from resgarden.base.errors import ConfigError
from resgarden.base.specs import DataSpec, EvalTransform, InferenceJob
from resgarden.data.datasets import CIFAR10_CLASSES, DIGITS_CLASSES
from resgarden.runtime.context import check_model

logger = logging.getLogger("resgarden")


def read_weights(job: InferenceJob) -> Checkpoint | None:
    """The checkpoint of ``--ckpt_path`` (a file, or a run folder's best, else latest), read once;
    None for ``--pretrained``. Exactly one of them must be given. Call after
    :func:`resgarden.runtime.context.set_context` (and, in a data-parallel job, ``init_cluster``): reading a
    checkpoint creates Parameters."""
    if bool(job.weights.pretrained) == bool(job.weights.ckpt_path):
        raise ConfigError("give exactly one of --pretrained or --ckpt_path (a file or a run folder)")
    return open_run_checkpoint(job.weights.ckpt_path) if job.weights.ckpt_path else None


def model_name(job: InferenceJob, checkpoint: Checkpoint | None) -> str:
    """``--model``, unless not given and the checkpoint tells its model (our run metadata, or the
    architecture of a mindspore/models checkpoint)."""
    name = job.model.name
    found = checkpoint.model_name() if checkpoint is not None else None
    if found and "model" not in job.given:
        name = found
    elif found and found != name:
        logger.warning("%s holds %s weights; using --model=%s as given", checkpoint.path, found, name)
    check_model(name)
    return name


def trained_on(job: InferenceJob, checkpoint: Checkpoint | None) -> str | None:
    """The data set the weights were trained on, as far as they say: the released weights and
    1000-class heads ImageNet; our runs by their classes (the digits, CIFAR-10, else the class
    folders of an ImageNet-layout set); None when nothing says (no weights, or a foreign head)."""
    if checkpoint is None:
        return "imagenet" if job.weights.pretrained else None
    classes = checkpoint.meta.get("classes")
    if classes:
        return {tuple(DIGITS_CLASSES): "digits", tuple(CIFAR10_CLASSES): "cifar10"}.get(tuple(classes), "imagenet")
    return "imagenet" if checkpoint.head_classes() == 1000 else None


def eval_data(job: InferenceJob, checkpoint: Checkpoint | None) -> DataSpec:
    """The data to score on: what ``--dataset`` / ``--data_dir`` name; with neither (``auto``),
    the data set the weights were trained on (:func:`trained_on`), ImageNet looked for in the
    current folder as README says; a ConfigError when the weights do not say."""
    data = job.data
    if data.dataset != "auto" or data.data_dir:
        return data
    kind = trained_on(job, checkpoint)
    if kind is None:
        source = checkpoint.path if checkpoint is not None else "a freshly initialised model"
        raise ConfigError(f"{source} does not say what data it was trained on: give --data_dir=<the data's folder>, "
                          "or --dataset=digits / cifar10")
    if kind == "imagenet" and not any(os.path.exists(name) for name in (data.val_split, f"{data.val_split}_list.txt")):
        what = "the released weights" if checkpoint is None else checkpoint.path
        raise ConfigError(f"{what} were trained on ImageNet, and the current folder has no '{data.val_split}/' or "
                          f"'{data.val_split}_list.txt': give --data_dir=/path/to/imagenet (or --dataset=digits to "
                          "score them on the embedded digits anyway)")
    return dataclasses.replace(data, dataset=kind)


def checkpoint_classes(job: InferenceJob, checkpoint: Checkpoint | None) -> int | None:
    """``--num_classes``, else the classes the checkpoint was trained on (run metadata, or its
    classifier's outputs); None when neither says."""
    if job.model.num_classes:
        return job.model.num_classes
    if checkpoint is None:
        return None
    return checkpoint.meta.get("num_classes") or checkpoint.head_classes()


def build_inference_model(job: InferenceJob, name: str, checkpoint: Checkpoint | None, num_classes: int) -> nn.Cell:
    """Model ``name`` (see :func:`model_name`) in eval mode with the released weights or
    ``checkpoint``, whose head must have ``num_classes`` outputs (1001 -> 1000 allowed); BatchNorm
    folded unless ``--fold_bn=False``; ``model.param_count`` is its unfolded parameter count."""
    model = models.create_model(name, pretrained=job.weights.pretrained,
                                num_classes=num_classes, in_channels=job.model.in_channels,
                                checkpoint_path=checkpoint, head="refuse")
    model.set_train(False)
    model.param_count = count_params(model)  # as published tables count them, before any folding
    if job.weights.fold_bn:
        logger.debug("folded %d BatchNorm layers into their convolutions (--fold_bn=False keeps them)",
                     fold_batchnorm(model))
    return model


def eval_transform(job: InferenceJob, model: nn.Cell) -> EvalTransform:
    """The eval transform the model's weights were published or trained with, except for the
    settings the user gave."""
    return model.pretrained_cfg.eval_transform.overridden_by(job.loader.eval_transform, job.given)

