"""Loading weights into our models: checkpoint reading, mindcv name mapping, readable reports."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import mindspore as ms
import numpy as np
from mindspore import nn

from resgarden.errors import UserError

logger = logging.getLogger("resgarden")

# mindcv layouts -> ours. Applied only to names the model does not have, first match wins.
# ResNeSt names its shortcut `downsample` and its head `fc`; Res2Net-v1b's stride-1 avg-down
# shortcut has no pool entry, so its conv/BN sit one index lower than in our (pool, conv, BN).
MINDCV_NAME_MAP: tuple[tuple[str, str], ...] = (
    (r"^(layer\d+\.\d+\.)downsample\.", r"\1down_sample."),
    (r"^fc\.", "classifier."),
    (r"^(layer1\.0\.down_sample\.)0\.", r"\g<1>1."),
    (r"^(layer1\.0\.down_sample\.)1\.", r"\g<1>2."),
)


# Entries of a training checkpoint that are not model weights: optimizer moments and counters,
# loss-scale state, and the run metadata saved beside the weights (see resgarden/checkpoint.py).
TRAINING_STATE_GROUPS = ("moments.", "accum.", "stat.", "adam_m.", "adam_v.", "lamb_m.", "lamb_v.", "ema.",
                         "meta.", "accum_grads.", "learning_rate_group_")
TRAINING_STATE_NAMES = frozenset({"global_step", "learning_rate", "momentum", "beta1_power", "beta2_power",
                                  "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                                  "epoch_num", "step_num", "loss_scale", "loss_scale_good_steps",
                                  "accum_micro_step", "ema_updates", "overflow_skipped_steps"})


def is_training_state(name: str) -> bool:
    """True for optimizer / loss-scale / run-metadata entries of a training checkpoint."""
    return name in TRAINING_STATE_NAMES or name.startswith(TRAINING_STATE_GROUPS)


class WeightsError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What happened when weights were loaded into a model."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self) -> str:
        """A readable summary: counts, then one line per problem parameter."""
        lines = [f"loaded {len(self.loaded)} parameters ({len(self.renamed)} renamed from mindcv layout)"]
        for name in self.missing:
            lines.append(f"  missing     {name}")
        for name in self.unexpected:
            lines.append(f"  unexpected  {name}")
        for name, (got, want) in self.mismatched.items():
            lines.append(f"  shape       {name}: checkpoint {list(got)} vs model {list(want)}")
        return "\n".join(lines)


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


def remap_names(state: Mapping[str, object], model_names: set[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Rename mindcv-layout parameters to ours; return the new dict and the renames made."""
    out: dict[str, object] = {}
    renamed: dict[str, str] = {}
    for name, value in state.items():
        new = name
        if name not in model_names:
            for pattern, repl in MINDCV_NAME_MAP:
                if re.search(pattern, name):
                    new = re.sub(pattern, repl, name)
                    break
        if new != name:
            renamed[name] = new
        out[new] = value
    return out, renamed


def _shape(value: object) -> tuple[int, ...]:
    return tuple(value.shape)  # Parameter, Tensor and ndarray all have .shape


def load_weights(model: nn.Cell, source: str | Mapping[str, object], strict: bool = True,
                 may_be_missing: tuple[str, ...] = ()) -> LoadReport:
    """Load a checkpoint path or a name -> Parameter/Tensor/ndarray dict into ``model``.

    Names in mindcv's layout are mapped to ours. Entries that are not parameters of the model
    are reported as unexpected; optimizer state and run metadata of our training checkpoints are
    skipped. With ``strict`` any missing,
    unexpected or mismatched parameter raises :class:`WeightsError` carrying the report table,
    and nothing is loaded. Parameters whose names start with one of ``may_be_missing`` (a head
    being replaced) keep their current values without counting as missing.
    """
    state = read_checkpoint(source) if isinstance(source, str) else dict(source)
    state = {k: v for k, v in state.items() if not is_training_state(k)}
    params = model.parameters_dict()
    state, renamed = remap_names(state, set(params))
    report = LoadReport(renamed=renamed)
    to_load: dict[str, ms.Parameter] = {}
    for name, value in state.items():
        if name not in params:
            report.unexpected.append(name)
        elif _shape(value) != tuple(params[name].shape):
            report.mismatched[name] = (_shape(value), tuple(params[name].shape))
        else:
            data = value if isinstance(value, ms.Parameter) else ms.Tensor(np.asarray(value))
            to_load[name] = data if isinstance(data, ms.Parameter) else ms.Parameter(data, name=name)
            report.loaded.append(name)
    report.missing = [n for n in params if n not in state and not n.startswith(may_be_missing)]
    if strict and not report.ok:
        origin = source if isinstance(source, str) else "state dict"
        raise WeightsError(f"weights from {origin} do not fit {type(model).__name__}:\n{report.table()}")
    ms.load_param_into_net(model, to_load, strict_load=False)
    return report


def adapt_head(state: dict[str, object], model: nn.Cell) -> tuple[str, ...]:
    """Fit a checkpoint's classifier to ``model``'s, in place; return the prefixes left unloaded.

    A 1001-class head (1000 classes + an unused last output, as some MindSpore releases have)
    is cut to 1000; any other difference in classes drops the head so the model keeps its freshly
    initialised one (fine-tuning), and the log says so.
    """
    renamed_state, _ = remap_names(state, set(model.parameters_dict()))
    state.clear()
    state.update(renamed_state)
    head = [k for k in ("classifier.weight", "classifier.bias") if k in state]
    if not head:
        return ()
    params = model.parameters_dict()
    have = _shape(state["classifier.weight"])[0] if "classifier.weight" in state else _shape(state[head[0]])[0]
    want = params["classifier.weight"].shape[0] if "classifier.weight" in params else 0
    if have == want:
        return ()
    if have == 1001 and want == 1000:
        for key in head:
            value = state[key]
            state[key] = (value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value))[:1000]
        logger.info("checkpoint head has 1001 outputs; using the first 1000")
        return ()
    for key in head:
        del state[key]
    logger.info("checkpoint head has %d classes, model has %d: classifier replaced by a fresh one", have, want)
    return ("classifier.",)
