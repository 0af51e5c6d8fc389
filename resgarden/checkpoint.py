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
import tempfile
from typing import Any

import mindspore as ms
from mindspore import nn

from models.weights import WeightsError, read_checkpoint

from .train_step import SKIPPED_STEPS

MANIFEST = "checkpoints.json"
META_PREFIX = "meta."
EMA_PREFIX = "ema."
logger = logging.getLogger("resgarden")


def save_atomic(cell: nn.Cell, path: str, meta: dict[str, Any]) -> None:
    """Save ``cell``'s parameters and ``meta`` to ``path`` via a temp file in the same folder."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    os.close(fd)
    try:
        append = {META_PREFIX + k: (json.dumps(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v)
                  for k, v in meta.items()}
        ms.save_checkpoint(cell, tmp, append_dict=append)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json_atomic(path: str, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def read_meta(state: dict[str, Any]) -> dict[str, Any]:
    """The ``meta.*`` entries of a loaded checkpoint as plain Python values."""
    meta = {}
    for key, value in state.items():
        if key.startswith(META_PREFIX):
            raw = value.asnumpy().item() if hasattr(value, "asnumpy") else value
            meta[key[len(META_PREFIX):]] = json.loads(raw) if isinstance(raw, str) else raw
    return meta


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
        name = f"{self.model_name}-e{meta['epoch'] + 1:03d}.ckpt"
        path = os.path.join(self.directory, name)
        save_atomic(cell, path, meta)
        self.entries = [e for e in self.entries if e["file"] != name]
        self.entries.append(dict(file=name, epoch=meta["epoch"], global_step=meta["global_step"],
                                 metric=meta.get("metric")))
        # top_k also keeps the newest checkpoint, whatever its metric: --resume needs it
        while len(self.entries) > self.keep + (self.policy == "top_k"):
            if self.policy == "top_k":
                worst = min(range(len(self.entries) - 1),
                            key=lambda i: (self.entries[i]["metric"], self.entries[i]["epoch"]))
                old = self.entries.pop(worst)
            else:
                old = self.entries.pop(0)
            old_path = os.path.join(self.directory, old["file"])
            if os.path.exists(old_path):
                os.remove(old_path)
        if is_best:
            save_atomic(cell, os.path.join(self.directory, f"{self.model_name}-best.ckpt"), meta)
        _write_json_atomic(os.path.join(self.directory, MANIFEST), self.entries)
        return path


def find_checkpoint(path: str, prefer_best: bool = False) -> str:
    """A checkpoint file from a file, a checkpoint folder or a run folder (its ``ckpt_0``).

    From a folder: the best checkpoint if ``prefer_best`` and present, else the latest listed in
    ``checkpoints.json``.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise WeightsError(f"checkpoint not found: {path}")
    folder = path if os.path.isfile(os.path.join(path, MANIFEST)) else os.path.join(path, "ckpt_0")
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        raise WeightsError(f"{path} holds no {MANIFEST}: not a run or checkpoint folder of train.py")
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


def read_run_weights(path: str, prefer_ema: bool = True) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model weights, run metadata, file) of a checkpoint file or run folder (best, else latest).

    When the run kept an EMA of the weights, those are returned (and the log says so).
    """
    source = find_checkpoint(path, prefer_best=True)
    state = dict(read_checkpoint(source))
    meta = read_meta(state)
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if ema and prefer_ema:
        logger.info("%s: using its EMA weights", source)
        return ema, meta, source
    return state, meta, source


def load_training_state(train_cell: nn.Cell, path: str) -> dict[str, Any]:
    """Load every parameter of ``train_cell`` from ``path`` (strict) and return its metadata."""
    state = read_checkpoint(path)
    params = train_cell.parameters_dict()
    missing = [n for n in params if n not in state and n != SKIPPED_STEPS]  # a counter older runs lack
    if missing:
        raise WeightsError(f"{path} cannot resume this run: {len(missing)} training parameters missing, "
                           f"e.g. {missing[:3]} (different model or optimizer?)")
    mismatched = [n for n in params if tuple(state[n].shape) != tuple(params[n].shape)]
    if mismatched:
        raise WeightsError(f"{path} cannot resume this run: shapes differ for {mismatched[:3]}")
    ms.load_param_into_net(train_cell, {n: state[n] for n in params if n in state}, strict_load=True)
    return read_meta(state)
