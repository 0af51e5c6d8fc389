"""Training checkpoints: atomic writes, keep-latest-k plus best, and the state exact resume needs.

A checkpoint holds every parameter of the training cell (weights, BN statistics, optimizer
moments and its global step) and, as ``meta.*`` entries, the epoch, global step, best metric,
model name and class list. ``checkpoints.json`` in the checkpoint folder lists the files with
their epoch and metric, so that resuming from a folder never parses file names.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from models.weights import META_PREFIX, SKIPPED_STEPS, Checkpoint, WeightsError, open_checkpoint, read_meta
from resgarden.base.atomic import atomic_path, write_text

MANIFEST = "checkpoints.json"
logger = logging.getLogger("resgarden")


def save_atomic(cell: nn.Cell | list[dict[str, Any]], path: str, meta: dict[str, Any]) -> None:
    """Save ``cell``'s parameters (or a list of ``{"name", "data"}`` entries) and ``meta`` (as
    ``meta.*`` entries) to ``path``, atomically."""
    append = {META_PREFIX + k: (json.dumps(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v)
              for k, v in meta.items()}
    with atomic_path(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint(cell, tmp, append_dict=append)


class CheckpointManager:
    """Epoch checkpoints ``<model>-e<epoch>.ckpt`` and ``<model>-best.ckpt``. Kept: the ``keep``
    latest (``policy="latest_k"``), or the ``keep`` best by metric plus the newest ("top_k")."""

    def __init__(self, directory: str, model_name: str, keep: int, policy: str = "latest_k") -> None:
        self.directory = directory
        self.model_name = model_name
        self.keep = max(1, keep)
        self.policy = policy
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, MANIFEST)
        self.entries: list[dict[str, Any]] = []
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as handle:
                self.entries = json.load(handle)

    def save(self, cell: nn.Cell, meta: dict[str, Any], is_best: bool) -> str:
        """Write an epoch's checkpoint, or a mid-epoch one (``meta["step_in_epoch"]``, written when
        training stops on request); an epoch's checkpoint supersedes the mid-epoch ones before it."""
        mid_epoch = meta.get("step_in_epoch")
        name = (f"{self.model_name}-e{meta['epoch'] + 2:03d}-step{mid_epoch:06d}.ckpt" if mid_epoch
                else f"{self.model_name}-e{meta['epoch'] + 1:03d}.ckpt")
        path = os.path.join(self.directory, name)
        save_atomic(cell, path, meta)
        superseded = [e for e in self.entries if e["file"] == name or (not mid_epoch and e.get("step_in_epoch"))]
        for old in superseded:
            if old["file"] != name and os.path.exists(os.path.join(self.directory, old["file"])):
                os.remove(os.path.join(self.directory, old["file"]))
        self.entries = [e for e in self.entries if e not in superseded]
        self.entries.append(dict(file=name, epoch=meta["epoch"], global_step=meta["global_step"],
                                 metric=meta.get("metric"), **({"step_in_epoch": mid_epoch} if mid_epoch else {})))
        # top_k also keeps the newest checkpoint, whatever its metric: --resume needs it
        while len(self.entries) > self.keep + (self.policy == "top_k"):
            if self.policy == "top_k":
                worst = min(range(len(self.entries) - 1), key=lambda i: (
                    _metric(self.entries[i]), self.entries[i]["epoch"]))
                old = self.entries.pop(worst)
            else:
                old = self.entries.pop(0)
            old_path = os.path.join(self.directory, old["file"])
            if os.path.exists(old_path):
                os.remove(old_path)
        if is_best:
            save_atomic(cell, os.path.join(self.directory, f"{self.model_name}-best.ckpt"), meta)
        write_text(os.path.join(self.directory, MANIFEST), json.dumps(self.entries, indent=1))
        return path


def _metric(entry: dict[str, Any]) -> float:
    """An entry's metric for the top-k policy; a mid-epoch checkpoint has none and goes first."""
    return float("-inf") if entry.get("metric") is None else entry["metric"]


def find_checkpoint(path: str, prefer_best: bool = False) -> str:
    """A checkpoint file from a file, a checkpoint folder or a run folder (its ``ckpt_0``).

    From a folder: the best checkpoint if ``prefer_best`` and present, else the latest listed in
    ``checkpoints.json``.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise WeightsError(f"checkpoint not found: {path}")
    folder = manifest_folder(path)
    if folder is None:
        return _newest_checkpoint_file(path)
    manifest = os.path.join(folder, MANIFEST)
    if prefer_best:
        best = [f for f in os.listdir(folder) if f.endswith("-best.ckpt")]
        if best:
            return os.path.join(folder, best[0])
    with open(manifest, encoding="utf-8") as handle:
        entries = json.load(handle)
    if not entries:
        raise WeightsError(f"{manifest} lists no checkpoints")
    latest = max(entries, key=lambda e: (e["epoch"], e["global_step"]))
    return os.path.join(folder, latest["file"])


def manifest_folder(path: str) -> str | None:
    """The folder of a run holding ``checkpoints.json``: ``path`` itself or its ``ckpt_0``; None if neither."""
    for folder in (path, os.path.join(path, "ckpt_0")):
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            return folder
    return None


def _newest_checkpoint_file(folder: str) -> str:
    """A folder of checkpoints another trainer wrote (mindspore/models' ``ckpt_0/``): its one
    ``.ckpt`` file, or the most recently written one (logged), never guessed from file names."""
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt")]
    if not files:
        raise WeightsError(f"{folder} holds neither {MANIFEST} (a run folder of train.py) nor .ckpt files")
    newest = max(files, key=os.path.getmtime)
    if len(files) > 1:
        logger.info("%s: no %s; taking the most recently written of its %d checkpoints, %s (name a file to "
                    "choose another)", folder, MANIFEST, len(files), os.path.basename(newest))
    return newest


def open_run_checkpoint(path: str) -> Checkpoint:
    """A checkpoint file, or a run / checkpoint folder's best (else latest) checkpoint, read once."""
    return open_checkpoint(find_checkpoint(path, prefer_best=True))


def is_lr_schedule(name: str) -> bool:
    """The optimizer's per-step learning rates: computed from the settings, never resumed."""
    return name.startswith("learning_rate")


def load_training_state(train_cell: nn.Cell, checkpoint: Checkpoint) -> dict[str, Any]:
    """Load every parameter of ``train_cell`` from ``checkpoint`` (strict) and return its metadata.
    The learning-rate schedule is the one computed for this run (the same for an unchanged
    schedule; a longer ``--epoch_size`` extends it), logged when it differs from the checkpoint's."""
    state, path = checkpoint.state, checkpoint.path
    everything = train_cell.parameters_dict()
    params = {n: p for n, p in everything.items() if not is_lr_schedule(n)}
    own_schedule = {n: p for n, p in everything.items() if is_lr_schedule(n)}
    changed = [n for n, p in own_schedule.items() if n in state and (
        tuple(state[n].shape) != tuple(p.shape) or not np.array_equal(state[n].asnumpy(), p.asnumpy()))]
    if changed:
        before, now = tuple(state[changed[0]].shape), tuple(own_schedule[changed[0]].shape)
        logger.info("the learning-rate schedule differs from the checkpoint's (%s -> %s optimizer steps): using the "
                    "one computed from the current settings, continuing at the checkpoint's step",
                    before[0] if before else 1, now[0] if now else 1)
    missing = [n for n in params if n not in state and n != SKIPPED_STEPS]  # a counter older runs lack
    if missing:
        raise WeightsError(f"{path} cannot resume this run: {len(missing)} training parameters missing, "
                           f"e.g. {missing[:3]} (different model or optimizer?)")
    mismatched = [n for n in params if tuple(state[n].shape) != tuple(params[n].shape)]
    if mismatched:
        raise WeightsError(f"{path} cannot resume this run: shapes differ for {mismatched[:3]}")
    kept = {n: ms.Parameter(p.value(), name=n) for n, p in own_schedule.items()}  # loaded onto themselves
    ms.load_param_into_net(train_cell, {**{n: state[n] for n in params if n in state}, **kept}, strict_load=True)
    return read_meta(state)
