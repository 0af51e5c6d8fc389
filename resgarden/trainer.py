"""The training loop: data, model, optimizer, logging, validation, checkpoints and exact resume."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import mindspore as ms
from mindspore import nn
from tqdm import tqdm

import models
from config import ConfigError, save_config
from models.profile import count_params
from models.weights import adapt_head, load_weights

from .amp import Float32Loss, apply_amp
from .checkpoint import EMA_PREFIX, CheckpointManager, find_checkpoint, load_training_state, read_run_weights
from .context import check_model, set_context, set_data_workers
from .data import load_splits, make_loader, uses_soft_targets
from .distributed import (Cluster, average_buffers, broadcast_parameters, describe_failure,
                          init_cluster, is_collective_failure, ranks_out_of_sync, seed_random_ops)
from .errors import DistributedError
from .evaluate import evaluate
from .logs import setup_logging
from .optim import create_optimizer, freeze_backbone, lr_per_step
from .platform import apply_cpu_speed_guard
from .plot import plot_metrics
from .steps import SinkSteps, batch_steps, sink_size_for, use_sink_mode
from .train_step import TrainStep

logger = logging.getLogger("resgarden")
EVAL_TRANSFORM_KEYS = ("image_size", "crop_pct", "interpolation", "mean", "std")


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
        seed_random_ops(cfg.seed, cluster)  # own dropout masks per rank; weights from rank 0 (below)
    if not cluster.is_main:
        setup_logging(quiet=True)
    _log_devices(cfg.device_target, cluster)
    set_data_workers(cfg, cluster)
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
    sink = None
    if use_sink_mode(cfg.dataset_sink_mode, cfg.device_target, cfg.mixup_off_epoch):
        sink_size = sink_size_for(steps_per_epoch, cfg.log_interval)
        loader, source = make_loader(train_split, cfg, training=True, epoch=start_epoch, num_classes=num_classes,
                                     shard=cluster.shard, epochs=cfg.epoch_size - start_epoch)
        sink = SinkSteps(train_cell, loader, sink_size, cfg.jit_level)
        logger.info("dataset sink mode: %d steps per call, epochs %d-%d in one device queue",
                    sink_size, start_epoch + 1, cfg.epoch_size)

    clock = RunClock(global_step, cfg.epoch_size * steps_per_epoch)
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epoch_size):
        if sink is None:
            loader, source = make_loader(train_split, cfg, training=True, epoch=epoch, num_classes=num_classes,
                                         shard=cluster.shard)
            steps = batch_steps(train_cell, loader, source)
        else:
            steps = sink.epoch(steps_per_epoch)
        bad_before = len(source.bad_files)
        epoch_start = time.perf_counter()
        train_loss, skipped = _run_epoch(steps, train_cell, clock, epoch, cfg, steps_per_epoch, cluster, lrs)
        global_step = clock.step
        average_buffers(train_cell, cluster)
        unreadable = int(cluster.all_reduce_sum([len(source.bad_files) - bad_before])[0])
        record = dict(epoch=epoch + 1, global_step=global_step, train_loss=train_loss,
                      lr=_lr(lrs, global_step, accumulation), epoch_seconds=time.perf_counter() - epoch_start,
                      unreadable_images=unreadable, skipped_steps=skipped)
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


@dataclass
class RunClock:
    """Steps done in this run and when it started, for the ETA."""
    step: int
    total_steps: int
    start_step: int = 0
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.start_step = self.step

    def eta(self) -> str:
        per_step = (time.perf_counter() - self.start) / max(self.step - self.start_step, 1)
        return _format_eta(per_step * (self.total_steps - self.step))


def _run_epoch(steps: Iterator[tuple[int, ms.Tensor]], train_cell: TrainStep, clock: RunClock, epoch: int, cfg,
               steps_per_epoch: int, cluster: Cluster, lrs) -> tuple[float, int]:
    """Run one epoch's ``steps``, logging every ``--log_interval`` steps; returns (mean training loss,
    optimizer steps skipped on overflow). Losses are read back from the device only where logged."""
    accumulation = max(1, cfg.gradient_accumulation_steps)
    skipped_at_start = skipped_logged = int(train_cell.skipped_steps.asnumpy())
    start, done, loss_sum, pending = time.perf_counter(), 0, 0.0, []
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epoch_size}", leave=False,
               disable=not (sys.stdout.isatty() and cluster.is_main))
    for count, loss in steps:
        clock.step += count
        before, done = done, done + count
        pending.append((count, loss))
        bar.update(count)
        if done // cfg.log_interval == before // cfg.log_interval and done < steps_per_epoch:
            continue
        losses = [(n, float(value.asnumpy())) for n, value in pending]  # the only read-back
        loss_sum, pending = loss_sum + sum(n * value for n, value in losses), []
        images_per_s = cluster.size * done * cfg.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1][1]:.4f}", img_s=f"{images_per_s:.1f}")
        logger.info("epoch %d/%d step %d/%d loss %.4f lr %.6f %.1f img/s eta %s", epoch + 1, cfg.epoch_size, done,
                    steps_per_epoch, losses[-1][1], _lr(lrs, clock.step, accumulation), images_per_s, clock.eta())
        skipped = int(train_cell.skipped_steps.asnumpy())
        if skipped > skipped_logged:
            logger.warning("%d optimizer step(s) skipped since the last log: gradients overflowed (loss scale now "
                           "%g); %d this epoch", skipped - skipped_logged, float(train_cell.loss_scale.asnumpy()),
                           skipped - skipped_at_start)
            skipped_logged = skipped
    bar.close()
    return loss_sum / max(done, 1), skipped_logged - skipped_at_start


def _log_devices(device_target: str, cluster: Cluster) -> None:
    """Which device each rank runs on, logged by rank 0 (a collective in a data-parallel job)."""
    if not cluster.distributed:
        logger.info("device: %s%s", device_target, "" if device_target == "CPU" else f" {cluster.device_id}")
        return
    ids = [int(i) for i in cluster.gather([cluster.device_id])[:, 0]]
    logger.info("devices: %s", ", ".join(f"rank {r} -> {device_target} {d}" for r, d in enumerate(ids)))


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
