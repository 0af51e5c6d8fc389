"""The checkpoint format, in one place: what a file holds (weights, training state, ``meta.*`` run
metadata, a run's EMA, a training wrapper's prefix), how it is read (:func:`open_checkpoint`) and
written (:func:`save_atomic`, atomically), and a run's checkpoints (keep-latest-k plus best, the
manifest, the state exact resume needs). Loading weights into a model: :mod:`models.weights`.

A training checkpoint holds every parameter of the training cell (weights, BN statistics, optimizer
moments and its global step) and, as ``meta.*`` entries, the epoch, global step, best metric,
model name and class list. ``checkpoints.json`` in the checkpoint folder lists the files with
their epoch and metric, so that resuming from a folder never parses file names.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import mindspore as ms
import numpy as np
from mindspore import nn

from resgarden.base.atomic import atomic_path, write_text
from resgarden.base.errors import UserError

from .layouts import Layout, detect_layout, source_model

logger = logging.getLogger("resgarden")

# Entries of a training checkpoint that are not model weights: optimizer moments and counters,
# loss-scale state, and the run metadata saved beside the weights (META_PREFIX).
SKIPPED_STEPS = "overflow_skipped_steps"  # the Parameter counting optimizer steps skipped on overflow
TRAINING_STATE_GROUPS = ("moments.", "accum.", "stat.", "adam_m.", "adam_v.", "lamb_m.", "lamb_v.", "ema.",
                         "meta.", "accum_grads.", "learning_rate_group_")
TRAINING_STATE_NAMES = frozenset({"global_step", "learning_rate", "momentum", "beta1_power", "beta2_power",
                                  "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                                  "epoch_num", "step_num", "loss_scale", "loss_scale_good_steps",
                                  "accum_micro_step", "ema_updates", SKIPPED_STEPS})


# prefixes a training wrapper gives every weight name when the checkpoint was saved from it (a
# WithLossCell / TrainOneStepCell subclass whose auto_prefix is on: mindspore/models' checkpoints);
# their own loaders strip "network."
WRAPPER_PREFIXES = ("network.", "_backbone.")


def is_training_state(name: str) -> bool:
    """True for optimizer / loss-scale / run-metadata entries of a training checkpoint."""
    return name in TRAINING_STATE_NAMES or name.startswith(TRAINING_STATE_GROUPS)


class WeightsError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


def shape_of(value: object) -> tuple[int, ...]:
    return tuple(value.shape)  # Parameter, Tensor and ndarray all have .shape


def read_checkpoint(path: str) -> dict[str, ms.Parameter]:
    """Read a MindSpore checkpoint, turning any failure into one clear WeightsError."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"checkpoint is empty (0 bytes): {path}")
    try:
        return ms.load_checkpoint(path)
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError/TypeError for bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read checkpoint {path} (truncated or not a MindSpore checkpoint): "
                           f"{first_line}") from None


HEAD_PREFIX = "classifier."
META_PREFIX = "meta."  # run metadata saved beside the weights (save_atomic)
EMA_PREFIX = "ema."  # the EMA of the weights a run kept


def read_meta(state: Mapping[str, object]) -> dict[str, object]:
    """The ``meta.*`` entries of a loaded checkpoint as plain Python values (empty for others)."""
    meta = {}
    for key, value in state.items():
        if key.startswith(META_PREFIX):
            raw = value.asnumpy().item() if hasattr(value, "asnumpy") else value
            meta[key[len(META_PREFIX):]] = json.loads(raw) if isinstance(raw, str) else raw
    return meta


@dataclass
class Checkpoint:
    """A checkpoint file as read: its entries, and the run metadata our training checkpoints carry."""

    path: str
    state: dict[str, object]

    @functools.cached_property
    def meta(self) -> dict[str, object]:
        return read_meta(self.state)

    @functools.cached_property
    def has_ema(self) -> bool:
        return any(k.startswith(EMA_PREFIX) for k in self.state)

    @functools.cached_property
    def model_state(self) -> dict[str, object]:
        """The model weights, in the checkpoint's own names (less a training wrapper's prefix, see
        :attr:`wrapper_prefix`): the run's EMA of them when it kept one, else the plain ones;
        optimizer state and run metadata left out."""
        if self.has_ema:
            weights = {k[len(EMA_PREFIX):]: v for k, v in self.state.items() if k.startswith(EMA_PREFIX)}
        else:
            weights = self.state
        weights = {k: v for k, v in weights.items() if not is_training_state(k)}
        return {k[len(self.wrapper_prefix):]: v for k, v in weights.items()}

    @functools.cached_property
    def wrapper_prefix(self) -> str:
        """The prefix every weight name carries because the checkpoint was saved from a training
        wrapper (``network.``, also repeated), or ""."""
        names = [k for k in (self.state if not self.has_ema else
                             (k[len(EMA_PREFIX):] for k in self.state if k.startswith(EMA_PREFIX)))
                 if not is_training_state(k)]
        prefix = ""
        while names:
            found = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
            if found is None:
                break
            prefix += found
        return prefix

    @functools.cached_property
    def layout(self) -> Layout:
        return detect_layout(self.model_state)

    def model_name(self) -> str | None:
        """The model these weights are for: our run metadata's, or a mindspore/models layout's
        architecture as its names and shapes tell; None when unknown."""
        if self.meta.get("model"):
            return str(self.meta["model"])
        return source_model(self.layout, self.model_state)

    def head_classes(self) -> int | None:
        """Outputs of the checkpoint's classifier (1001 counts as the 1000 classes it holds)."""
        head = next((v for k, v in self.model_state.items() if self.layout.rename(k) == HEAD_PREFIX + "weight"),
                    None)
        if head is None:
            return None
        rows = int(shape_of(head)[0])
        return 1000 if rows == 1001 else rows


def open_checkpoint(path: str) -> Checkpoint:
    """Read ``path`` once (one clear WeightsError if it cannot be read)."""
    return Checkpoint(path, dict(read_checkpoint(path)))


# ---------------------------------------------------------------- a run's checkpoints

MANIFEST = "checkpoints.json"


NOT_SAVED = ("teacher.",)  # parameters a training cell holds that are not the run's: a distillation teacher


def save_atomic(cell: nn.Cell | list[dict[str, Any]], path: str, meta: dict[str, Any]) -> None:
    """Save ``cell``'s parameters (or a list of ``{"name", "data"}`` entries) and ``meta`` (as
    ``meta.*`` entries) to ``path``, atomically; a teacher's (:data:`NOT_SAVED`) are left out."""
    append = {META_PREFIX + k: (json.dumps(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v)
              for k, v in meta.items()}
    with atomic_path(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint(cell, tmp, append_dict=append, choice_func=lambda name: not name.startswith(NOT_SAVED))


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
    everything = {n: p for n, p in train_cell.parameters_dict().items() if not n.startswith(NOT_SAVED)}
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
