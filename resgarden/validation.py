"""Score a checkpoint or released weights on a data split: the engine of validate.py and eval.py."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from config import ConfigError

from .data import ensure_digits, imagenet_root, load_cifar10_split, load_imagenet_split, resolve_dataset
from .context import set_context, set_data_workers
from .distributed import current, init_cluster
from .evaluate import evaluate
from .inference import build_inference_model, resolve_weights

logger = logging.getLogger("resgarden")


def _eval_split(cfg):
    dataset = resolve_dataset(cfg)
    if dataset == "cifar10":
        return load_cifar10_split(cfg.data_dir or "./data/cifar10", False, cfg.dataset_download)
    if dataset == "digits":
        return load_imagenet_split(ensure_digits(cfg.data_dir or "./data/digits"), cfg.val_split)
    return load_imagenet_split(imagenet_root(cfg), cfg.val_split, plain_folder_ok=bool(cfg.data_dir))


def validate(cfg) -> dict[str, Any]:
    """Top-1/top-5/loss/count/img/s of ``--pretrained`` weights or ``--ckpt_path`` on the eval split."""
    set_context(cfg)
    # with --distribute each rank scores a shard and the counts are summed; joined before the
    # checkpoint is read, since MindSpore needs init() before any Parameter on Ascend
    cluster = init_cluster(cfg)
    set_data_workers(cfg, cluster)
    state, meta, source = resolve_weights(cfg)
    with cluster.main_first():  # rank 0 writes / downloads the data and weights first
        split = _eval_split(cfg)
    if meta.get("classes") and meta["classes"] != split.classes:
        raise ConfigError(f"{source} was trained on other classes than the {cfg.val_split} split here")
    num_classes = cfg.num_classes or meta.get("num_classes") or (1000 if cfg.pretrained else len(split.classes))
    if int(split.labels.max()) >= num_classes:
        raise ConfigError(f"the data has labels up to {int(split.labels.max())} but the model has {num_classes} classes")
    with cluster.main_first():
        model = build_inference_model(cfg, num_classes, state)
    logger.info("validating %s (%s) on %d images, %d px, crop %.3f%s", cfg.model, source, len(split),
                cfg.image_size, cfg.crop_pct, f", {cluster.size} ranks" if cluster.distributed else "")
    result = dict(model=cfg.model, weights=source, **evaluate(model, split, cfg, cluster))
    if not cluster.is_main:
        return result
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


def format_result(result: dict[str, Any]) -> str | None:
    """One line for the user; None on ranks > 0 of a data-parallel validation."""
    if not current().is_main:
        return None
    return (f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}  images {result['count']}  {result['img_s']:.1f} img/s")
