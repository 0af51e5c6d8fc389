"""The one way weights enter our models: layout name mapping, head fitting, readable reports
(the checkpoint file itself: :mod:`models.checkpoint`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import mindspore as ms
import numpy as np
from mindspore import nn

from resgarden.base.specs import EvalTransform

from .checkpoint import HEAD_PREFIX, Checkpoint, WeightsError, is_training_state, open_checkpoint, shape_of
from .layouts import detect_layout, to_our_names


@dataclass
class LoadReport:
    """What happened when weights were loaded into a model."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    layout: str = "mindcv"  # the checkpoint's layout (models/layouts.py); ours is mindcv's
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # reshaping done, head fitted, EMA taken

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self) -> str:
        """A readable summary: counts, then one line per problem parameter."""
        lines = [f"loaded {len(self.loaded)} parameters ({len(self.renamed)} renamed from {self.layout} layout)"]
        lines += [f"  note        {note}" for note in self.notes]
        for name in self.missing:
            lines.append(f"  missing     {name}")
        for name in self.unexpected:
            lines.append(f"  unexpected  {name}")
        for name, (got, want) in self.mismatched.items():
            lines.append(f"  shape       {name}: checkpoint {list(got)} vs model {list(want)}")
        return "\n".join(lines)


HEAD_POLICIES = ("refuse", "replace")


@dataclass(frozen=True)
class WeightsInfo:
    """What a created model carries about its weights (timm's ``pretrained_cfg``): their source,
    the eval transform they were published or trained with, their classes and published top-1."""

    source: str | None = None  # URL or file; None: freshly initialised
    eval_transform: EvalTransform = EvalTransform()
    classes: tuple[str, ...] | None = None
    top1: float | None = None
    build: tuple[tuple[str, str], ...] = ()  # create_model settings the weights need (e.g. conv_pad="same")

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint, default: EvalTransform) -> WeightsInfo:
        meta = checkpoint.meta
        transform = EvalTransform.from_dict(meta["eval_transform"]) if "eval_transform" in meta else default
        classes = tuple(meta["classes"]) if meta.get("classes") else None
        return cls(source=checkpoint.path, eval_transform=transform, classes=classes)


def build_settings(checkpoint: Checkpoint) -> tuple[str, dict[str, str]]:
    """(where from, create_model settings) that make a model compute as the checkpoint's source
    network did: a foreign layout's (``models.layouts``), or those our run recorded in its metadata
    (a model fine-tuned from such weights keeps them)."""
    if checkpoint.layout.build:
        return f"the {checkpoint.layout.name} network", dict(checkpoint.layout.build)
    recorded = checkpoint.meta.get("build") or {}
    return "the run that saved it", {str(k): str(v) for k, v in dict(recorded).items()}


def load_weights(model: nn.Cell, source: str | Checkpoint | Mapping[str, object], strict: bool = True,
                 head: str = "refuse") -> LoadReport:
    """Load a checkpoint path or a name -> Parameter/Tensor/ndarray dict into ``model``: the one way
    weights enter a model (released weights, ``--ckpt_path``, ``create_model(checkpoint_path=...)``,
    validate, infer, export).

    Optimizer state and run metadata of training checkpoints are skipped, and a run that kept an
    EMA of its weights gives those; other layouts (mindcv's, mindspore/models') are recognised and
    mapped to ours (:mod:`models.layouts`). The classifier: a 1001-class head (1000 classes and the
    unused extra output of some MindSpore releases) is cut to 1000; a head of other classes is kept
    and fails the shape check with ``head="refuse"``, or is dropped with ``head="replace"`` so the
    model keeps its freshly initialised one (fine-tuning). With ``strict`` any missing, unexpected
    or mismatched parameter raises :class:`WeightsError` carrying the report table, and nothing is
    loaded.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f"head={head!r}: use one of {HEAD_POLICIES}")
    checkpoint = open_checkpoint(source) if isinstance(source, str) else source
    wrapper = ""
    if isinstance(checkpoint, Checkpoint):
        origin, state, layout, ema = checkpoint.path, checkpoint.model_state, checkpoint.layout, checkpoint.has_ema
        wrapper = checkpoint.wrapper_prefix
    else:  # a name -> value mapping is taken as it is (no EMA preference)
        state = {k: v for k, v in checkpoint.items() if not is_training_state(k)}
        origin, layout, ema = "state dict", detect_layout(state), False
    params = model.parameters_dict()
    unsupported = layout.unsupported_part(set(state))
    if unsupported:
        raise WeightsError(f"{origin} is a {layout.name} checkpoint of {unsupported}")
    state, renamed, notes = to_our_names(layout, state, set(params))
    report = LoadReport(renamed=renamed, layout=layout.name, notes=notes)
    if wrapper:
        report.notes.append(f"saved from a training wrapper: the '{wrapper}' prefix of every name stripped")
    unused = tuple(getattr(model, "unused_weights", ()))  # parts a features-only model does not build
    skipped = {k for k in state if k.startswith(unused) and k not in params} if unused else set()
    if skipped:
        state = {k: v for k, v in state.items() if k not in skipped}
        report.notes.append(f"{len(skipped)} weights of parts this model does not build skipped "
                            f"({', '.join(p.rstrip('.') for p in unused)})")
    if ema:
        report.notes.append("the run kept an EMA of its weights: using it")
    replaced = _fit_head(state, params, head, report.notes)
    _fit_input_conv(state, params, report.notes)
    to_load: dict[str, ms.Parameter] = {}
    for name, value in state.items():
        if name not in params:
            report.unexpected.append(name)
        elif shape_of(value) != tuple(params[name].shape):
            report.mismatched[name] = (shape_of(value), tuple(params[name].shape))
        else:
            data = value if isinstance(value, ms.Parameter) else ms.Tensor(np.asarray(value))
            to_load[name] = data if isinstance(data, ms.Parameter) else ms.Parameter(data, name=name)
            report.loaded.append(name)
    report.missing = [n for n in params if n not in state and not (replaced and n.startswith(HEAD_PREFIX))]
    if strict and not report.ok:
        raise WeightsError(f"weights from {origin} do not fit {type(model).__name__}:\n{report.table()}")
    ms.load_param_into_net(model, to_load, strict_load=False)
    return report


INPUT_CONVS = ("conv1.weight", "conv1.0.weight")  # the stem's first convolution: 7x7, or the deep stem's 3x3


def _fit_input_conv(state: dict[str, object], params: Mapping[str, ms.Parameter], notes: list[str]) -> None:
    """RGB weights into a model of other input channels, in place, as timm's ``adapt_input_conv``
    does: one channel takes the sum over R, G and B; N channels repeat R, G, B (cut to N) and scale
    by 3 / N, which keeps the activations' scale (exact for 1 or a multiple of 3 channels holding
    the same plane)."""
    name = next((n for n in INPUT_CONVS if n in state and n in params), None)
    if name is None:
        return
    weight = state[name]
    weight = weight.asnumpy() if hasattr(weight, "asnumpy") else np.asarray(weight)
    have, want = weight.shape[1], int(params[name].shape[1])
    if have == want or have != 3 or weight.shape[0] != params[name].shape[0]:
        return  # the shape check reports anything else
    if want == 1:
        adapted = weight.sum(axis=1, keepdims=True)
    else:
        adapted = np.tile(weight, (1, -(-want // 3), 1, 1))[:, :want] * (3.0 / want)
    state[name] = adapted.astype(weight.dtype)
    notes.append(f"the input convolution ({name}) adapted from 3 to {want} channels (summed RGB for 1; RGB "
                 "repeated and scaled by 3/N otherwise, as timm's adapt_input_conv)")


def _fit_head(state: dict[str, object], params: Mapping[str, ms.Parameter], head: str, notes: list[str]) -> bool:
    """Fit the checkpoint's classifier (our names) to the model's, in place; True when it was
    dropped so that the model keeps its own (``head="replace"``)."""
    keys = [k for k in (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias") if k in state]
    if not keys:
        return False
    have = shape_of(state[keys[0]])[0]
    want = params[HEAD_PREFIX + "weight"].shape[0] if HEAD_PREFIX + "weight" in params else 0
    if have == want:
        return False
    if have == 1001 and want == 1000:
        for key in keys:
            value = state[key]
            state[key] = (value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value))[:1000]
        notes.append("the checkpoint's head has 1001 outputs (1000 classes + an unused one): using the first 1000")
        return False
    if head == "refuse":
        return False  # the shape check reports it
    for key in keys:
        del state[key]
    notes.append(f"the checkpoint's head has {have} classes, the model {want}: "
                 + ("classifier replaced by a fresh one" if want else "no classifier (features only)"))
    return True
