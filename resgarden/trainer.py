"""The training loop: data, model, optimizer, logging, validation, checkpoints and exact resume."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any

import mindspore as ms
from mindspore import nn
from tqdm import tqdm

import models
from config import ConfigError, save_config
from models.pretrained import CACHE_ENV
from models.profile import count_params
from models.weights import adapt_head, load_weights

from .amp import Float32Loss, apply_amp
from .checkpoint import EMA_PREFIX, CheckpointManager, find_checkpoint, load_training_state, read_run_weights
from .data import load_splits, make_loader, uses_soft_targets
from .distributed import (Cluster, DistributedError, average_buffers, broadcast_parameters, describe_failure,
                          init_cluster, is_collective_failure, ranks_out_of_sync)
from .evaluate import evaluate
from .optim import create_optimizer, freeze_backbone, lr_per_step
from .platform import apply_cpu_speed_guard
from .plot import plot_metrics
from .train_step import TrainStep

logger = logging.getLogger("resgarden")
EVAL_TRANSFORM_KEYS = ("image_size", "crop_pct", "interpolation", "mean", "std")
GRAPH_RECURSION_LIMIT = 4000


def setup_logging(log_file: str | None = None, quiet: bool = False) -> None:
    """INFO to stdout, and to ``log_file`` when given (once per process); ``quiet`` (ranks > 0 of a
    data-parallel job): warnings and errors only."""
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout
               for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    if log_file:  # one run's log file at a time, also when train() is called again in-process
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
            old.close()
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def set_context(cfg) -> None:
    """Execution mode and device; one clear error where the device is not available."""
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == 0 else ms.PYNATIVE_MODE)
    try:
        if ms.get_context("device_target") != cfg.device_target:
            ms.set_device(cfg.device_target)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device_target={cfg.device_target} is not usable here: {str(exc).splitlines()[0]}") from None
    ms.set_seed(cfg.seed)
    # graph compilation of a 100-layer net's optimizer over grouped parameters nests deeper than
    # MindSpore's default limit of 1000 calls (res2net101 reaches it)
    ms.set_recursion_limit(GRAPH_RECURSION_LIMIT)
    if cfg.weights_cache:
        os.environ[CACHE_ENV] = cfg.weights_cache


def build_model(cfg, num_classes: int) -> nn.Cell:
    """The model with pretrained weights or ``--ckpt_path`` weights, the head fitted to the data."""
    model = models.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                in_channels=cfg.in_channels, drop_rate=cfg.drop_rate,
                                drop_path_rate=cfg.drop_path_rate)
    if cfg.ckpt_path and not cfg.resume:
        state, _, path = read_run_weights(cfg.ckpt_path)
        report = load_weights(model, state, may_be_missing=adapt_head(state, model))
        logger.info("initial weights from %s: %s", path, report.table())
    return model


def _run_dirs(cfg) -> tuple[str, str]:
    if cfg.resume:
        ckpt_dir = os.path.dirname(os.path.abspath(find_checkpoint(cfg.resume)))
        return os.path.dirname(ckpt_dir), ckpt_dir
    run_dir = os.path.join(cfg.ckpt_save_dir, datetime.now().strftime("%Y-%m-%d_time_%H_%M_%S"))
    suffix, candidate = 1, run_dir
    while os.path.exists(candidate):
        suffix, candidate = suffix + 1, f"{run_dir}_{suffix}"
    return candidate, os.path.join(candidate, "ckpt_0")


def check_model(cfg) -> None:
    """``cfg.model`` must be registered; else a ConfigError naming the closest models."""
    try:
        models.check_model_name(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def train(cfg) -> dict[str, Any]:
    """Train as configured (data-parallel with ``cfg.distribute``); returns the final epoch's metrics
    and the run folder."""
    check_model(cfg)
    set_context(cfg)
    cluster = init_cluster(cfg)  # msrun's scheduler process stays in here: no side effects before
    try:
        return _fit(cfg, cluster)
    except RuntimeError as exc:
        if not cluster.distributed or isinstance(exc, DistributedError) or not is_collective_failure(exc):
            raise
        raise DistributedError(describe_failure(exc, cfg.dist_timeout, wait=10.0)) from None


def _fit(cfg, cluster: Cluster) -> dict[str, Any]:
    """Data, model, epochs: everything after joining the job."""
    if cluster.distributed:
        logger.info("rank %d of %d (pid %d, %s) joined", cluster.rank, cluster.size, os.getpid(), cluster.launcher)
    if not cluster.is_main:
        setup_logging(quiet=True)
    with cluster.main_first():  # rank 0 downloads / writes the data set, then the others read it
        train_split, val_split = load_splits(cfg)
    num_classes = cfg.num_classes or len(train_split.classes)
    if uses_soft_targets(cfg) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair up images: batch_size must be even, got {cfg.batch_size}")
    if num_classes < len(train_split.classes):
        raise ConfigError(f"num_classes={num_classes} but the data has {len(train_split.classes)} classes")
    steps_per_epoch = len(train_split) // cluster.size // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} x {cluster.size} ranks is larger than the "
                          f"{len(train_split)} training images")

    run_dir, ckpt_dir = _run_dirs(cfg)
    if cluster.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        setup_logging(os.path.join(run_dir, "train.log"))
    model = build_model(cfg, num_classes)
    broadcast_parameters(model, cluster)  # every rank starts from rank 0's weights
    accumulation = max(1, cfg.gradient_accumulation_steps)
    if cluster.distributed:
        logger.info("data parallel: %d ranks (%s) | global batch %d = %d per rank x %d ranks x %d accumulation | "
                    "lr %g as configured, not rescaled (linear rule: lr x global batch / recipe's batch)",
                    cluster.size, cluster.launcher, cfg.batch_size * cluster.size * accumulation,
                    cfg.batch_size, cluster.size, accumulation, cfg.lr)
    lrs = lr_per_step(cfg, steps_per_epoch / accumulation)
    # with mixup/cutmix the targets arrive smoothed already
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.0 if uses_soft_targets(cfg) else cfg.label_smoothing)
    if cfg.freeze_backbone:
        logger.info("frozen backbone: %d parameters fixed, training the classifier only", freeze_backbone(model))
    optimizer = create_optimizer(model, cfg, lrs)
    network = nn.WithLossCell(apply_amp(model, cfg.amp_level), Float32Loss(loss_fn))
    train_cell = TrainStep(network, optimizer, loss_scale=cfg.loss_scale,
                           dynamic_loss_scale=cfg.loss_scale_type == "dynamic",
                           clip_norm=cfg.clip_value if cfg.clip_grad else 0.0, accumulation_steps=accumulation,
                           ema_decay=cfg.ema_decay if cfg.ema else 0.0)
    train_cell.set_train(True)
    ema_model = models.create_model(cfg.model, num_classes=num_classes, in_channels=cfg.in_channels) \
        if cfg.ema else None

    start_epoch, global_step, best = 0, 0, float("-inf")
    if cfg.resume:
        path = find_checkpoint(cfg.resume)
        meta = load_training_state(train_cell, path)
        if meta.get("classes") != train_split.classes:
            raise ConfigError(f"{path} was trained on other classes than {cfg.data_dir}")
        start_epoch, global_step = meta["epoch"] + 1, meta["global_step"]
        best = meta.get("best_metric", best)
        logger.info("resumed from %s: epoch %d, step %d", path, start_epoch, global_step)
    manager = None
    if cluster.is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        manager = CheckpointManager(ckpt_dir, cfg.model, cfg.keep_checkpoint_max, cfg.ckpt_save_policy)
    logger.info("model %s: %d classes, %s params | %d train / %s val images | %d steps/epoch, batch %d | run %s",
                cfg.model, num_classes, f"{count_params(model):,}", len(train_split),
                len(val_split) if val_split else "no", steps_per_epoch, cfg.batch_size, run_dir)
    if cfg.device_target == "CPU":
        logger.info("CPU speed: %s", apply_cpu_speed_guard())  # decided on import, logged here for the run

    total_steps = cfg.epoch_size * steps_per_epoch
    record: dict[str, Any] = {}
    run_start, run_start_step = time.perf_counter(), global_step
    for epoch in range(start_epoch, cfg.epoch_size):
        loader, source = make_loader(train_split, cfg, training=True, epoch=epoch, num_classes=num_classes,
                                     shard=cluster.shard)
        epoch_start, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epoch_size}", leave=False,
                   disable=not (sys.stdout.isatty() and cluster.is_main))
        for i, (images, labels) in enumerate(loader.create_tuple_iterator(num_epochs=1)):
            loss = float(train_cell(images, labels).asnumpy())
            global_step += 1
            loss_sum, seen = loss_sum + loss * len(labels), seen + len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{seen / (time.perf_counter() - epoch_start):.1f}")
            if (i + 1) % cfg.log_interval == 0 or i + 1 == steps_per_epoch:
                elapsed = time.perf_counter() - run_start
                per_step = elapsed / max(global_step - run_start_step, 1)
                logger.info("epoch %d/%d step %d/%d loss %.4f lr %.6f %.1f img/s eta %s",
                            epoch + 1, cfg.epoch_size, i + 1, steps_per_epoch, loss, _lr(lrs, global_step, accumulation),
                            cluster.size * seen / (time.perf_counter() - epoch_start),
                            _format_eta(per_step * (total_steps - global_step)))
        bar.close()
        average_buffers(train_cell, cluster)
        unreadable = int(cluster.all_reduce_sum([len(source.bad_files)])[0])
        record = dict(epoch=epoch + 1, global_step=global_step, train_loss=loss_sum / max(seen, 1),
                      lr=_lr(lrs, global_step, accumulation), epoch_seconds=time.perf_counter() - epoch_start,
                      unreadable_images=unreadable)
        last = epoch + 1 == cfg.epoch_size
        if val_split is not None and cfg.val_while_train and ((epoch + 1) % cfg.val_interval == 0 or last):
            metrics = evaluate(_with_ema_weights(ema_model, train_cell) if ema_model else model, val_split, cfg,
                               cluster)
            record.update(val_top1=metrics["top1"], val_top5=metrics["top5"], val_loss=metrics["loss"])
            logger.info("epoch %d validation: top-1 %.2f%% top-5 %.2f%% loss %.4f (%d images)",
                        epoch + 1, metrics["top1"], metrics["top5"], metrics["loss"], metrics["count"])
        metric = record.get("val_top1", -record["train_loss"])
        is_best = metric > best
        best = max(best, metric)
        if not cluster.is_main:
            continue
        if (epoch + 1) % cfg.ckpt_save_interval == 0 or last:
            meta = dict(epoch=epoch, global_step=global_step, metric=metric, best_metric=best,
                        model=cfg.model, num_classes=num_classes, classes=train_split.classes,
                        eval_transform={k: getattr(cfg, k) for k in EVAL_TRANSFORM_KEYS})
            logger.info("saved %s", manager.save(train_cell, meta, is_best))
        with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    if cluster.distributed:
        _check_in_sync(train_cell, cluster)
    if cluster.is_main and os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        logger.info("curves: %s", plot_metrics(os.path.join(run_dir, "metrics.jsonl"),
                                                os.path.join(run_dir, "curves.png")))
    record.update(run_dir=run_dir, rank=cluster.rank)
    return record


def _check_in_sync(train_cell: nn.Cell, cluster: Cluster) -> None:
    """Log whether every rank ends with rank 0's weights, BN statistics and optimizer state."""
    differing = ranks_out_of_sync(train_cell, cluster)
    if differing:
        logger.error("ranks %s ended with other weights than rank 0: the job is out of sync", differing)
    else:
        logger.info("all %d ranks hold identical weights and optimizer state", cluster.size)


def _lr(lrs, global_step: int, accumulation: int) -> float:
    """The LR of the optimizer step that micro-step ``global_step`` belongs to."""
    return float(lrs[min((global_step - 1) // accumulation, len(lrs) - 1)])


def _with_ema_weights(ema_model: nn.Cell, train_cell: TrainStep) -> nn.Cell:
    """``ema_model`` holding the current EMA of the trained weights."""
    ema = {p.name[len(EMA_PREFIX):]: ms.Parameter(p.value(), name=p.name[len(EMA_PREFIX):])
           for p in train_cell.ema_params}
    ms.load_param_into_net(ema_model, ema, strict_load=True)
    return ema_model


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
