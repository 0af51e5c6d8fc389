"""Score a checkpoint or released weights on a data split: the engine of validate.py and eval.py."""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
from typing import Any

import models
from resgarden.base.atomic import write_text
from resgarden.base.errors import ConfigError, UserError
from resgarden.base.specs import InferenceJob
from resgarden.data.datasets import load_eval_split
from resgarden.data.real_labels import read_real_labels
from resgarden.inference.accuracy import evaluate
from resgarden.inference.model_loading import (
    build_inference_model,
    checkpoint_classes,
    eval_data,
    eval_transform,
    model_name,
    read_weights,
)
from resgarden.inference.results_table import append_result
from resgarden.runtime.context import set_context, with_data_workers
from resgarden.runtime.distributed import current, init_cluster

logger = logging.getLogger("resgarden")


def validate(job: InferenceJob) -> dict[str, Any]:
    """Top-1/top-5/loss/count/img/s of ``--pretrained`` weights or ``--ckpt_path`` on the eval split."""
    set_context(job.context)
    # with --distribute each rank scores a shard and the counts are summed; joined before the
    # checkpoint is read, since MindSpore needs init() before any Parameter on Ascend
    cluster = init_cluster(job.cluster)
    loader = with_data_workers(job.loader, cluster)
    checkpoint = read_weights(job)
    name = model_name(job, checkpoint)
    meta = checkpoint.meta if checkpoint else {}
    source = checkpoint.path if checkpoint else "pretrained"
    data = eval_data(job, checkpoint)
    with cluster.main_first():  # rank 0 writes / downloads the data and weights first
        split = load_eval_split(data)
    if meta.get("classes") and meta["classes"] != split.classes and not _index_named(split.classes):
        raise ConfigError(f"{source} was trained on other classes than the {data.val_split} split here")
    num_classes = checkpoint_classes(job, checkpoint) or (1000 if job.weights.pretrained else len(split.classes))
    if int(split.labels.max()) >= num_classes:
        raise ConfigError(f"the data has labels up to {int(split.labels.max())} but the model has {num_classes} classes")
    real = read_real_labels(job.real_labels, split, num_classes) if job.real_labels else None  # before the model
    with cluster.main_first():
        model = build_inference_model(job, name, checkpoint, num_classes)
    loader = dataclasses.replace(loader, eval_transform=eval_transform(job, model))
    transform = loader.eval_transform
    logger.info("validating %s (%s) on %d images, %d px, crop %.3f%s", name, source, len(split),
                transform.image_size, transform.crop_pct, f", {cluster.size} ranks" if cluster.distributed else "")
    result = dict(model=name, weights=source, **evaluate(model, split, loader, cluster, real))
    if cluster.is_main and job.json_path:
        write_text(job.json_path, json.dumps(result, indent=1))
    if cluster.is_main and job.results_csv:
        append_result(job.results_csv, dict(result, image_size=transform.image_size, crop_pct=transform.crop_pct,
                                             interpolation=transform.interpolation, param_count=model.param_count))
    return result


PATTERN_CHARACTERS = "*?["


def models_to_score(job: InferenceJob) -> list[str]:
    """``--model`` as given, or the registered models its shell-style pattern matches (``'res2net*'``;
    with ``--pretrained`` those with released weights), as timm's validate.py takes them."""
    pattern = job.model.name
    if not any(c in pattern for c in PATTERN_CHARACTERS):
        return [pattern]
    if not job.weights.pretrained:
        raise ConfigError(f"--model={pattern!r} scores several models' released weights: add --pretrained")
    names = models.list_models(pattern)
    released = [n for n in names if (w := models.model_card(n).weights) is not None and w.url]
    if not released:
        raise ConfigError(f"no model matching {pattern!r} has released weights"
                          + (f" ({', '.join(names)} have none)" if names else "; `python -m models --list` shows them"))
    skipped = sorted(set(names) - set(released))
    if skipped:
        logger.info("no released weights, not scored: %s", ", ".join(skipped))
    return released


def validate_models(job: InferenceJob) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`validate` for each of :func:`models_to_score`, logging each result as it comes; a model
    that fails is logged and the others go on. Returns the results and the failures ("name (why)")."""
    names = models_to_score(job)
    if names == [job.model.name]:
        return [validate(job)], []
    results, failed = [], []
    for index, name in enumerate(names, 1):
        one = dataclasses.replace(job, model=dataclasses.replace(job.model, name=name), given=job.given | {"model"})
        try:
            results.append(validate(one))
            line = format_result(results[-1])
            if line:
                logger.info("[%d/%d] %s", index, len(names), line)
        except UserError as exc:
            failed.append(f"{name} ({exc})")
            logger.error("[%d/%d] %s: %s", index, len(names), name, exc)
        gc.collect()  # the model and its compiled graphs before the next one
    return results, failed


def _index_named(classes: list[str]) -> bool:
    """Class folders named by the class indices (ImageNet-V2's ``0`` .. ``999``): the labels are
    the indices, whatever names the weights were trained with."""
    return classes == [str(i) for i in range(len(classes))]


def format_result(result: dict[str, Any]) -> str | None:
    """One line for the user; None on ranks > 0 of a data-parallel validation."""
    if not current().is_main:
        return None
    real = (f"  ReaL top-1 {result['real_top1']:.2f}% top-5 {result['real_top5']:.2f}% ({result['real_count']} images)"
            if "real_top1" in result else "")
    return (f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}  images {result['count']}{real}  {result['img_s']:.1f} img/s")
