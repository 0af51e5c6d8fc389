"""Average the weights of several checkpoints of one run (the last k, or the k best by validation
top-1, as its ``checkpoints.json`` lists them) into one checkpoint that validate.py, export.py and
``--ckpt_path`` take. The run's EMA weights are averaged where it kept them; BatchNorm running
statistics are averaged like the weights."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import mindspore as ms
import numpy as np

from models.checkpoint import MANIFEST, manifest_folder, open_checkpoint, save_atomic
from resgarden.base.errors import ConfigError
from resgarden.base.specs import AverageSpec

logger = logging.getLogger("resgarden")
POSITION_KEYS = ("epoch", "global_step", "step_in_epoch", "metric", "best_metric")  # not true of an average


def choose(entries: list[dict[str, Any]], last: int, best: int) -> list[dict[str, Any]]:
    """The epoch checkpoints to average: the ``last`` newest or the ``best`` of highest metric (val
    top-1, or minus the training loss in a run without validation)."""
    if (last > 0) == (best > 0):
        raise ConfigError("give one of --last K (the K newest epoch checkpoints) or --best K (the K best by val top-1)")
    epochs = [e for e in entries if not e.get("step_in_epoch")]  # mid-epoch ones are for resuming only
    wanted = last or best
    if best:
        epochs = [e for e in epochs if e.get("metric") is not None]
        if len(epochs) < wanted:
            raise ConfigError(f"--best {wanted}: the run lists {len(epochs)} epoch checkpoints "
                              "(--ckpt_save_policy=top_k keeps the best --keep_checkpoint_max)")
        top = sorted(epochs, key=lambda e: (-e["metric"], -e["epoch"]))[:wanted]  # ties: the newer
        return sorted(top, key=lambda e: e["epoch"])
    if len(epochs) < wanted:
        raise ConfigError(f"--last {wanted}: the run lists {len(epochs)} epoch checkpoints "
                          "(--keep_checkpoint_max sets how many it keeps)")
    return sorted(epochs, key=lambda e: (e["epoch"], e["global_step"]))[-wanted:]


def average_checkpoints(spec: AverageSpec) -> str:
    """Write the average of the chosen checkpoints of ``spec.run_path``; returns a line for the user."""
    folder = manifest_folder(spec.run_path)
    if folder is None:
        raise ConfigError(f"{spec.run_path} is not a run folder of train.py (no {MANIFEST} in it or in its ckpt_0/)")
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
        chosen = choose(json.load(handle), spec.last, spec.best)
    checkpoints = [open_checkpoint(os.path.join(folder, e["file"])) for e in chosen]
    names = list(checkpoints[0].model_state)
    for checkpoint in checkpoints[1:]:
        if list(checkpoint.model_state) != names:
            raise ConfigError(f"{checkpoint.path} holds other weights than {checkpoints[0].path}: not one run's")
    averaged = []
    for name in names:
        values = [c.model_state[name].asnumpy() for c in checkpoints]
        mean = np.mean(np.stack(values).astype(np.float64), axis=0).astype(values[0].dtype)
        averaged.append({"name": name, "data": ms.Tensor(mean)})
    newest = max(checkpoints, key=lambda c: (c.meta.get("epoch", -1), c.meta.get("global_step", -1)))
    meta = {k: v for k, v in newest.meta.items() if k not in POSITION_KEYS}
    meta["averaged_from"] = [e["file"] for e in chosen]
    meta["ema"] = newest.has_ema
    model = meta.get("model", "model")
    out = spec.file_name or os.path.join(folder, f"{model}-avg-{'last' if spec.last else 'best'}{len(chosen)}.ckpt")
    save_atomic(averaged, out, meta)
    kind = "EMA weights" if newest.has_ema else "weights"
    epochs = ", ".join(str(e["epoch"] + 1) for e in chosen)
    logger.info("averaged the %s of epochs %s (%d tensors, BatchNorm statistics included)", kind, epochs, len(names))
    return f"wrote {out}: the mean of {len(chosen)} checkpoints' {kind} (epochs {epochs})"
