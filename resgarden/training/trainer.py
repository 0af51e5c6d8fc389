"""The training loop: setup, one epoch, end of epoch (validation, checkpoint, metrics), exact resume."""
from __future__ import annotations

import json
import logging
import math
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
from models.checkpoint import (
    EMA_PREFIX,
    Checkpoint,
    CheckpointManager,
    find_checkpoint,
    load_training_state,
    open_checkpoint,
    open_run_checkpoint,
)
from models.profile import count_params
from resgarden.base.atomic import remove_stale, write_text
from resgarden.base.errors import ConfigError, DistributedError, Preempted, StepCountError, TrainingDiverged, WriteError
from resgarden.base.logs import setup_logging
from resgarden.base.preemption import StopRequest, stop_requests
from resgarden.base.specs import LoaderSpec, TrainJob
from resgarden.data.datasets import Split, load_splits, make_loader, samples_per_rank
from resgarden.inference.accuracy import evaluate
from resgarden.platform import apply_cpu_speed_guard
from resgarden.runtime.context import check_model, set_context, with_data_workers
from resgarden.runtime.distributed import (
    Cluster,
    average_buffers,
    broadcast_parameters,
    describe_failure,
    init_cluster,
    is_collective_failure,
    ranks_out_of_sync,
    seed_random_ops,
)
from resgarden.training.amp import Float32Loss, apply_amp
from resgarden.training.board import Board
from resgarden.training.distill import DistillationLoss, build_teacher
from resgarden.training.losses import BinaryCrossEntropy
from resgarden.training.optim import create_optimizer, freeze_backbone, lr_per_step
from resgarden.training.plot import plot_metrics
from resgarden.training.steps import SinkSteps, batch_steps, sink_size_for, use_sink_mode
from resgarden.training.train_step import TrainStep

logger = logging.getLogger("resgarden")


def train(job: TrainJob) -> dict[str, Any]:
    """Train as ``job`` says (data-parallel with ``job.cluster.distribute``); returns the final
    epoch's metrics, the run folder and this process's rank."""
    check_model(job.model.name)
    set_context(job.context)
    cluster = init_cluster(job.cluster)  # msrun's scheduler process stays in here: no side effects before
    try:
        with stop_requests() as stop:
            return _fit(job, cluster, stop)
    except RuntimeError as exc:
        if not cluster.distributed or isinstance(exc, DistributedError) or not is_collective_failure(exc):
            raise
        raise DistributedError(describe_failure(exc, job.cluster.dist_timeout, wait=10.0)) from None


@dataclass
class Run:
    """One training run as it goes: its data, cells, folders and progress."""

    job: TrainJob
    cluster: Cluster
    loader: LoaderSpec  # job.loader with this rank's worker count
    train_split: Split
    val_split: Split | None
    num_classes: int
    steps_per_epoch: int
    run_dir: str = ""
    ckpt_dir: str = ""
    lrs: Any = None
    model: nn.Cell | None = None
    ema_model: nn.Cell | None = None
    train_cell: TrainStep | None = None
    manager: CheckpointManager | None = None
    start_epoch: int = 0
    start_step: int = 0
    resume_step: int = 0  # resumed mid-epoch: the steps of start_epoch already done
    stop: StopRequest = field(default_factory=StopRequest)
    best: float = float("-inf")
    sink_source: Any = None  # dataset sink mode: the batch source of all remaining epochs
    board: Board = field(default_factory=lambda: Board(None))  # TensorBoard (rank 0, --tensorboard)


def _fit(job: TrainJob, cluster: Cluster, stop: StopRequest) -> dict[str, Any]:
    """Everything after joining the job: setup, the epochs, the end of the run."""
    run = _setup(job, cluster)
    run.stop = stop
    sink = _sink_steps(run)
    clock = RunClock(run.start_step, job.run.epochs * run.steps_per_epoch)
    record: dict[str, Any] = {}
    try:
        for epoch in range(run.start_epoch, job.run.epochs):
            record = _train_epoch(run, epoch, clock, sink)
            stop_now = record.pop("stop_requested") and epoch + 1 < job.run.epochs
            path = _end_epoch(run, epoch, record, force_save=stop_now)
            if stop_now:  # asked at the epoch's last step: its checkpoint is the one to resume from
                _preempted(run, f"after epoch {epoch + 1}", path)
    finally:
        run.board.close()
    if cluster.distributed:
        _check_in_sync(run.train_cell, cluster)
    metrics = os.path.join(run.run_dir, "metrics.jsonl")
    if cluster.is_main and os.path.isfile(metrics):
        logger.info("curves: %s", plot_metrics(metrics, os.path.join(run.run_dir, "curves.png")))
    record.update(run_dir=run.run_dir, rank=cluster.rank)
    return record


def _setup(job: TrainJob, cluster: Cluster) -> Run:
    """Data, run folder, model, training cell, resumed state and checkpoint manager, logged."""
    if cluster.distributed:
        logger.info("rank %d of %d (pid %d, %s) joined", cluster.rank, cluster.size, os.getpid(), cluster.launcher)
        seed_random_ops(job.context.seed, cluster)  # own dropout masks per rank; weights from rank 0 (below)
    if not cluster.is_main:
        setup_logging(quiet=True)
    _log_devices(job.context.device_target, cluster)
    run = _load_data(job, cluster)
    run.run_dir, run.ckpt_dir = _run_dirs(job.run.output_dir, job.run.resume, claim=cluster.is_main)
    if cluster.is_main:
        try:
            os.makedirs(run.ckpt_dir, exist_ok=True)
            setup_logging(os.path.join(run.run_dir, "train.log"))
        except OSError as exc:
            raise WriteError(run.ckpt_dir, exc) from None
        stale = remove_stale(run.ckpt_dir)
        if stale:
            logger.info("removed %d temporary file(s) an interrupted save left in %s: %s", len(stale), run.ckpt_dir,
                        ", ".join(stale))
    resumed = open_checkpoint(find_checkpoint(job.run.resume)) if job.run.resume else None
    if resumed is not None:
        check_resumable(job, resumed, run.train_split.classes)
    run.model = build_model(job, run.num_classes, resumed)
    broadcast_parameters(run.model, cluster)  # every rank starts from rank 0's weights
    if cluster.distributed:
        logger.info("data parallel: %d ranks (%s) | global batch %d = %d per rank x %d ranks x %d accumulation | "
                    "lr %g as configured, not rescaled (linear rule: lr x global batch / recipe's batch)",
                    cluster.size, cluster.launcher, run.loader.batch_size * cluster.size * job.step.accumulation,
                    run.loader.batch_size, cluster.size, job.step.accumulation, job.schedule.lr)
    _build_train_cell(run)
    if resumed is not None:
        _resume(run, resumed)
    if cluster.is_main:
        write_text(os.path.join(run.run_dir, "config.yaml"), job.run.config_yaml)
        run.manager = CheckpointManager(run.ckpt_dir, job.model.name, job.run.keep_checkpoints, job.run.save_policy)
        if job.run.tensorboard:
            run.board = Board(run.run_dir, run.start_step)
            run.board.text("config", "```yaml\n" + job.run.config_yaml + "```", run.start_step)
            logger.info("TensorBoard: tensorboard --logdir %s", run.board.folder)
    logger.info("model %s: %d classes, %s params | %d train / %s val images | %d steps/epoch, batch %d | run %s",
                job.model.name, run.num_classes, f"{count_params(run.model):,}", len(run.train_split),
                len(run.val_split) if run.val_split else "no", run.steps_per_epoch, run.loader.batch_size,
                run.run_dir)
    if job.context.device_target == "CPU":
        logger.info("CPU speed: %s", apply_cpu_speed_guard())  # decided on import, logged here for the run
    return run


def _load_data(job: TrainJob, cluster: Cluster) -> Run:
    """The splits (rank 0 downloads / writes them first) and what follows from them, checked."""
    loader = with_data_workers(job.loader, cluster)
    with cluster.main_first():
        train_split, val_split = load_splits(job.data)
    num_classes = job.model.num_classes or len(train_split.classes)
    if loader.mixing.enabled and loader.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair up images: batch_size must be even, got {loader.batch_size}")
    if num_classes < len(train_split.classes):
        raise ConfigError(f"num_classes={num_classes} but the data has {len(train_split.classes)} classes")
    steps_per_epoch = samples_per_rank(len(train_split), cluster.size, loader.aug_repeats) // loader.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={loader.batch_size} x {cluster.size} ranks is larger than the "
                          f"{len(train_split)} training images")
    return Run(job, cluster, loader, train_split, val_split, num_classes, steps_per_epoch)


def build_model(job: TrainJob, num_classes: int, resumed: Checkpoint | None = None) -> nn.Cell:
    """The model to train: released weights (``--pretrained``) or a checkpoint's (``--ckpt_path``)
    with the head replaced when its classes differ. Resuming, neither: the model is built as the
    run recorded (its padding) and its own state is loaded later."""
    weights = job.weights
    if weights.pretrained and weights.ckpt_path:
        raise ConfigError("give --pretrained or --ckpt_path to start from, not both")
    common = dict(num_classes=num_classes, in_channels=job.model.in_channels, drop_rate=job.model.drop_rate,
                  drop_path_rate=job.model.drop_path_rate, frozen_stages=job.model.frozen_stages)
    if resumed is not None:
        return models.create_model(job.model.name, **common, **dict(resumed.meta.get("build") or {}))
    checkpoint = open_run_checkpoint(weights.ckpt_path) if weights.ckpt_path else None
    return models.create_model(job.model.name, pretrained=weights.pretrained, checkpoint_path=checkpoint,
                               head="replace", **common)


def _build_train_cell(run: Run) -> None:
    """Schedule, loss, optimizer, the training step Cell and the EMA model (if any)."""
    job = run.job
    run.lrs = lr_per_step(job.schedule, run.steps_per_epoch / job.step.accumulation)
    # with mixup/cutmix the targets arrive smoothed already
    smoothing = 0.0 if run.loader.mixing.enabled else job.step.label_smoothing
    if job.step.bce_loss:
        loss_fn = BinaryCrossEntropy(smoothing, job.step.bce_target_thresh, soft_targets=run.loader.mixing.enabled)
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    if job.model.frozen_stages >= 0:
        fixed = sum(1 for p in run.model.get_parameters()
                    if not p.requires_grad and not p.name.endswith(("moving_mean", "moving_variance")))
        k = job.model.frozen_stages
        stages = "" if k == 0 else " and stage 1" if k == 1 else f" and stages 1-{k}"
        logger.info("frozen stages: the stem%s fixed (%d parameters, BatchNorm statistics kept)", stages, fixed)
    if job.optim.freeze_backbone:
        logger.info("frozen backbone: %d parameters fixed, training the classifier only", freeze_backbone(run.model))
    optimizer = create_optimizer(run.model, job.optim, run.lrs)
    student = apply_amp(run.model, job.step.amp_level)
    if job.distill.teacher_model:
        teacher = build_teacher(job.distill, run.num_classes, job.step.amp_level)
        network = DistillationLoss(student, teacher, loss_fn, job.distill.alpha, job.distill.temperature)
    else:
        network = nn.WithLossCell(student, Float32Loss(loss_fn))
    step = job.step
    run.train_cell = TrainStep(network, optimizer, loss_scale=step.loss_scale,
                               dynamic_loss_scale=step.dynamic_loss_scale, clip_norm=step.clip_norm,
                               accumulation_steps=step.accumulation, ema_decay=step.ema_decay, ema_of=run.model)
    run.train_cell.set_train(True)
    if step.ema_decay > 0:  # computes as the trained model does (its padding)
        run.ema_model = models.create_model(job.model.name, num_classes=run.num_classes,
                                            in_channels=job.model.in_channels, **dict(run.model.pretrained_cfg.build))


def check_resumable(job: TrainJob, checkpoint: Checkpoint, classes: list[str]) -> None:
    """The resumed run's model, classes and epochs fit this one; else one line naming both sides."""
    meta = checkpoint.meta
    if meta.get("model") and meta["model"] != job.model.name:
        raise ConfigError(f"{checkpoint.path} was trained as {meta['model']}, not --model={job.model.name}: resume "
                          "with its model (leave out --model), or start a new run")
    trained = meta.get("classes")
    if trained is not None and list(trained) != list(classes):
        differ = sorted(set(trained) ^ set(classes))
        raise ConfigError(f"{checkpoint.path} was trained on {len(trained)} classes, {job.data.data_dir or 'the data'} "
                          f"has {len(classes)}" + (f" (e.g. {', '.join(differ[:3])} in one only)" if differ else
                                                   " in another order"))
    if meta.get("epoch", -1) + 1 >= job.run.epochs:
        raise ConfigError(f"{checkpoint.path} already finished epoch {meta['epoch'] + 1} of --epoch_size="
                          f"{job.run.epochs}: give a larger --epoch_size to train on")


def _resume(run: Run, checkpoint: Checkpoint) -> None:
    """Every parameter of the training cell, the epoch, step and best metric from ``--resume``."""
    path = checkpoint.path
    meta = load_training_state(run.train_cell, checkpoint)
    run.start_epoch, run.start_step = meta["epoch"] + 1, meta["global_step"]
    run.resume_step = int(meta.get("step_in_epoch") or 0)
    run.best = meta.get("best_metric", run.best)
    where = (f"at epoch {run.start_epoch + 1} step {run.resume_step}/{run.steps_per_epoch}" if run.resume_step
             else f"after epoch {run.start_epoch}")
    logger.info("resumed from %s %s (global step %d)", path, where, run.start_step)


def _run_dirs(output_dir: str, resume: str | None, claim: bool) -> tuple[str, str]:
    """(run folder, checkpoint folder): the resumed run's, or a new timestamped one. ``claim`` (the
    rank that writes) creates the new folder with an exclusive ``mkdir``, so two runs started in
    the same second (a job array, a retry loop) never share one: the later takes ``<time>_2``."""
    if resume:
        ckpt_dir = os.path.dirname(os.path.abspath(find_checkpoint(resume)))
        return os.path.dirname(ckpt_dir), ckpt_dir
    run_dir = os.path.join(output_dir, datetime.now().strftime("%Y-%m-%d_time_%H_%M_%S"))
    candidate, suffix = run_dir, 1
    while claim:
        try:
            os.makedirs(output_dir, exist_ok=True)
            os.mkdir(candidate)
            break
        except FileExistsError:
            suffix += 1
            candidate = f"{run_dir}_{suffix}"
        except OSError as exc:
            raise WriteError(candidate, exc) from None
    return candidate, os.path.join(candidate, "ckpt_0")


def _sink_steps(run: Run) -> SinkSteps | None:
    """Dataset sink mode over all remaining epochs, when asked for and possible."""
    job = run.job
    if not use_sink_mode(job.run.sink_mode, job.context.device_target, run.loader.mixing.off_epoch):
        return None
    sink_size = sink_size_for(run.steps_per_epoch, job.run.log_interval, run.resume_step)
    if run.resume_step and sink_size < sink_size_for(run.steps_per_epoch, job.run.log_interval):
        logger.info("dataset sink mode: resumed at step %d of %d, so %d steps per call (a divisor of both) for "
                    "the rest of the run", run.resume_step, run.steps_per_epoch, sink_size)
    dataset, run.sink_source = make_loader(run.train_split, run.loader, training=True, epoch=run.start_epoch,
                                           num_classes=run.num_classes, shard=run.cluster.shard,
                                           epochs=job.run.epochs - run.start_epoch, first_batch=run.resume_step)
    logger.info("dataset sink mode: %d steps per call, epochs %d-%d in one device queue",
                sink_size, run.start_epoch + 1, job.run.epochs)
    return SinkSteps(run.train_cell, dataset, sink_size, job.context.jit_level)


def _train_epoch(run: Run, epoch: int, clock: RunClock, sink: SinkSteps | None) -> dict[str, Any]:
    """One epoch's steps (the rest of it, for a run resumed mid-epoch); returns its record (loss,
    LR, time, unreadable images, skipped steps). Stopped on request, it writes a checkpoint at
    that step and raises Preempted."""
    first_step, run.resume_step = (run.resume_step, 0) if epoch == run.start_epoch else (0, 0)
    if sink is None:
        dataset, source = make_loader(run.train_split, run.loader, training=True, epoch=epoch,
                                      num_classes=run.num_classes, shard=run.cluster.shard, first_batch=first_step)
        steps = batch_steps(run.train_cell, dataset, source)
    else:
        steps, source = sink.epoch(run.steps_per_epoch - first_step), run.sink_source
    bad_before = len(source.bad_files)
    epoch_start = time.perf_counter()
    train_loss, skipped, stopped_at = _run_epoch(steps, run, clock, epoch, first_step)
    average_buffers(run.train_cell, run.cluster)  # linear in the statistics: exact also mid-epoch
    if stopped_at is not None and stopped_at < run.steps_per_epoch:
        _stop_mid_epoch(run, epoch, stopped_at, clock.step)
    unreadable = int(run.cluster.all_reduce_sum([len(source.bad_files) - bad_before])[0])
    return dict(epoch=epoch + 1, global_step=clock.step, train_loss=train_loss,
                lr=_lr(run.lrs, clock.step, run.job.step.accumulation), epoch_seconds=time.perf_counter() - epoch_start,
                unreadable_images=unreadable, skipped_steps=skipped, stop_requested=stopped_at is not None)


def _stop_mid_epoch(run: Run, epoch: int, step_in_epoch: int, global_step: int) -> None:
    """Write a checkpoint at this step of ``epoch`` (rank 0), say how to resume, raise Preempted."""
    path = None
    if run.cluster.is_main:
        meta = _checkpoint_meta(run, epoch=epoch - 1, step_in_epoch=step_in_epoch, global_step=global_step,
                                metric=None)
        path = run.manager.save(run.train_cell, meta, is_best=False)
    _preempted(run, f"at epoch {epoch + 1} step {step_in_epoch}/{run.steps_per_epoch}", path)


def _preempted(run: Run, where: str, path: str | None) -> None:
    """Raise Preempted; rank 0 logs and carries the one line saying how to resume from ``path``."""
    message = ""
    if run.cluster.is_main:
        message = (f"stopped by {run.stop.signal_name} {where}; checkpoint {path}; resume with: "
                   f"python train.py --resume={run.run_dir}")
        logger.warning(message)
    raise Preempted(message)


def _checkpoint_meta(run: Run, **progress: Any) -> dict[str, Any]:
    """What a checkpoint of this run records beside the cell: ``progress`` (epoch, steps, metric)
    and what validate, export and --resume read back."""
    return dict(progress, best_metric=run.best, model=run.job.model.name, num_classes=run.num_classes,
                classes=run.train_split.classes, eval_transform=run.loader.eval_transform.as_dict(),
                build=dict(run.model.pretrained_cfg.build))


def _end_epoch(run: Run, epoch: int, record: dict[str, Any], force_save: bool = False) -> str | None:
    """Validation when due, the best metric, the checkpoint (when due or ``force_save``) and the
    metrics line (rank 0 writes); returns the checkpoint written, if any."""
    job, last = run.job, epoch + 1 == run.job.run.epochs
    if run.val_split is not None and job.run.val_while_train and ((epoch + 1) % job.run.val_interval == 0 or last):
        model = _with_ema_weights(run.ema_model, run.train_cell) if run.ema_model else run.model
        metrics = evaluate(model, run.val_split, run.loader, run.cluster)
        record.update(val_top1=metrics["top1"], val_top5=metrics["top5"], val_loss=metrics["loss"])
        logger.info("epoch %d validation: top-1 %.2f%% top-5 %.2f%% loss %.4f (%d images)",
                    epoch + 1, metrics["top1"], metrics["top5"], metrics["loss"], metrics["count"])
    metric = record.get("val_top1", -record["train_loss"])
    is_best = metric > run.best
    run.best = max(run.best, metric)
    if not run.cluster.is_main:
        return None
    path = None
    if (epoch + 1) % job.run.save_interval == 0 or last or force_save:
        meta = _checkpoint_meta(run, epoch=epoch, global_step=record["global_step"], metric=metric)
        path = run.manager.save(run.train_cell, meta, is_best)
        logger.info("saved %s", path)
    run.board.scalars(record["global_step"], {"train/epoch_loss": record["train_loss"], "val/top1": record.get("val_top1"),
                                              "val/top5": record.get("val_top5"), "val/loss": record.get("val_loss")})
    metrics = os.path.join(run.run_dir, "metrics.jsonl")
    try:
        with open(metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise WriteError(metrics, exc) from None
    return path


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


def _run_epoch(steps: Iterator[tuple[int, ms.Tensor]], run: Run, clock: RunClock, epoch: int,
               first_step: int = 0) -> tuple[float, int, int | None]:
    """Run one epoch's ``steps`` (from step ``first_step`` of it, for a run resumed mid-epoch),
    logging every ``--log_interval`` steps; returns (mean training loss, optimizer steps skipped on
    overflow, the step of the epoch it stopped at on request, or None). Losses are read back from the device only where logged; a
    non-finite one there ends the run (see :func:`_check_progress`)."""
    train_cell, cluster, steps_per_epoch = run.train_cell, run.cluster, run.steps_per_epoch
    accumulation, epochs, log_interval = run.job.step.accumulation, run.job.run.epochs, run.job.run.log_interval
    skipped_at_start = skipped_logged = int(train_cell.skipped_steps.asnumpy())
    start, done, loss_sum, pending, stopped = time.perf_counter(), first_step, 0.0, [], None
    bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=not (sys.stdout.isatty() and cluster.is_main))
    for count, loss in steps:
        clock.step += count
        before, done = done, done + count
        pending.append((count, loss))
        bar.update(count)
        if done // log_interval == before // log_interval and done < steps_per_epoch:
            if not cluster.distributed and run.stop.requested:  # one process stops at the next step
                stopped = done
                break
            continue
        losses = [(n, float(value.asnumpy())) for n, value in pending]  # the only read-back
        loss_sum, pending = loss_sum + sum(n * value for n, value in losses), []
        images_per_s = cluster.size * (done - first_step) * run.loader.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1][1]:.4f}", img_s=f"{images_per_s:.1f}")
        lr = _lr(run.lrs, clock.step, accumulation)
        logger.info("epoch %d/%d step %d/%d loss %.4f lr %.6f %.1f img/s eta %s", epoch + 1, epochs, done,
                    steps_per_epoch, losses[-1][1], lr, images_per_s, clock.eta())
        skipped = int(train_cell.skipped_steps.asnumpy())
        if run.board.folder:
            run.board.scalars(clock.step, {"train/loss": losses[-1][1], "train/lr": lr, "train/img_per_s": images_per_s,
                                           "train/loss_scale": float(train_cell.loss_scale.asnumpy()),
                                           "train/skipped_steps": skipped})
        _check_device_steps(run, clock.step, skipped)
        if skipped > skipped_logged:
            logger.warning("%d optimizer step(s) skipped since the last log: gradients overflowed (loss scale now "
                           "%g); %d this epoch", skipped - skipped_logged, float(train_cell.loss_scale.asnumpy()),
                           skipped - skipped_at_start)
            skipped_logged = skipped
        if _check_progress(run, [value for _, value in losses], clock.step):
            stopped = done
            break
    bar.close()
    return loss_sum / max(done - first_step, 1), skipped_logged - skipped_at_start, stopped


def _check_progress(run: Run, losses: list[float], step: int) -> bool:
    """At a log point: whether to stop on request (every rank agrees, at the same step). A
    non-finite loss without dynamic loss scaling (which skips such steps) ends the run here."""
    diverged = not run.job.step.dynamic_loss_scale and not all(math.isfinite(v) for v in losses)
    stop, diverged = (int(v) for v in run.cluster.all_reduce_sum([int(run.stop.requested), int(diverged)])) \
        if run.cluster.distributed else (int(run.stop.requested), int(diverged))
    if diverged:
        last = run.manager.entries[-1]["file"] if run.manager and run.manager.entries else None
        raise TrainingDiverged(
            f"the training loss is not finite at step {step} (lr {_lr(run.lrs, step, run.job.step.accumulation):g}): "
            "lower --lr, add --warmup_epochs, --clip_grad or --loss_scale_type=dynamic"
            + (f"; the last good checkpoint is {os.path.join(run.ckpt_dir, last)}" if last else ""))
    return bool(stop)


def _check_device_steps(run: Run, micro_steps: int, skipped: int) -> None:
    """At a log point: the optimizer's own step count plus the steps skipped on overflow must be the
    optimizer steps the loop counted; else (a sink call that ran fewer steps than its sink size)
    StepCountError, before LR, checkpoints and the resume point go wrong."""
    applied = int(run.train_cell.optimizer.global_step.asnumpy().reshape(-1)[0])
    counted = micro_steps // run.job.step.accumulation
    if applied + skipped == counted:
        return
    last = run.manager.entries[-1]["file"] if run.manager and run.manager.entries else None
    raise StepCountError(
        f"the device ran {applied + skipped} optimizer steps ({applied} applied, {skipped} skipped on overflow) "
        f"where the training loop counted {counted}"
        + (": dataset sink mode ran another number of steps per call than asked (--dataset_sink_mode=False "
           "trains without it, or give --jit_level explicitly)" if run.job.run.sink_mode else "")
        + (f"; the last good checkpoint is {os.path.join(run.ckpt_dir, last)}" if last else ""))


def _log_devices(device_target: str, cluster: Cluster) -> None:
    """Which device each rank runs on, logged by rank 0 (a collective in a data-parallel job)."""
    if not cluster.distributed:
        logger.info("device: %s%s", device_target, "" if device_target == "CPU" else f" {cluster.device_id}")
        return
    ids = [int(i) for i in cluster.gather([cluster.device_id])[:, 0]]
    logger.info("devices: %s", ", ".join(f"rank {r} -> {device_target} {d}" for r, d in enumerate(ids)))


def _check_in_sync(train_cell: nn.Cell, cluster: Cluster) -> None:
    """Log whether every rank ends with rank 0's weights, BN statistics and optimizer state."""
    differing = ranks_out_of_sync(train_cell.get_parameters(), cluster)
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
