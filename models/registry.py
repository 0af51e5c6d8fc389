"""Model registry and factory in mindcv's style: ``register_model``, ``list_models``, ``create_model``.

Each variant registers one :class:`Card` beside its builder, in its family's file: what it is
(parameters, GMACs, its timm twin) and its weights. Everything else reads the cards: the tests
(exact parameters and GMACs, timm parity), ``benchmark.py``, ``python -m models`` and the
README's zoo table (``zoo_table``, checked by a test). Adding a variant is one function there.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from typing import Any, Callable

from mindspore import nn

from resgarden.base.specs import EvalTransform

from .checkpoint import Checkpoint, open_checkpoint
from .pretrained import Pretrained, cache_dir, load_pretrained
from .timm_hub import is_timm_source, timm_checkpoint
from .weights import WeightsInfo, build_settings, load_weights

logger = logging.getLogger("resgarden")
BUILD_SETTINGS = ("conv_pad", "pool_pad")  # how a model computes, recorded with the weights trained in it



@dataclasses.dataclass(frozen=True)
class Card:
    """One variant: its builder and what is known of it."""

    name: str
    family: str  # the module that defines it: resnet, res2net, resnest
    build: Callable[..., nn.Cell]
    params: int  # trainable parameters at 1000 classes (asserted by the tests)
    gmacs: float  # multiply-accumulates of one 224 px image, in billions, to 2 decimals (asserted too)
    timm: str  # the same architecture in timm (parity tests, benchmark.py)
    weights: Pretrained | None = None  # released weights, or accuracy published without them

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or self.name).strip().splitlines()[0]


_CARDS: dict[str, Card] = {}


def register_model(*, params: int, gmacs: float, timm: str,
                   weights: Pretrained | None = None) -> Callable[[Callable[..., nn.Cell]], Callable[..., nn.Cell]]:
    """Register the decorated variant function under its own name with its card; its module
    names the family."""
    def register(fn: Callable[..., nn.Cell]) -> Callable[..., nn.Cell]:
        name = fn.__name__
        if name in _CARDS:
            raise ValueError(f"model {name!r} is registered twice")
        _CARDS[name] = Card(name, fn.__module__.rsplit(".", 1)[-1], fn, params, gmacs, timm, weights)
        return fn
    return register


def model_card(name: str) -> Card:
    """The card of a registered model (ValueError naming the closest ones otherwise)."""
    return _CARDS[check_model_name(name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. ``"res2net50*"``), sorted."""
    return sorted(n for n in _CARDS if fnmatch.fnmatch(n, pattern))


def model_family(name: str) -> str:
    """The module (resnet, res2net, resnest) that defines ``name``."""
    return model_card(name).family


def check_model_name(name: str) -> str:
    """Return ``name`` if registered, else raise ValueError naming the closest registered models."""
    if name in _CARDS:
        return name
    close = difflib.get_close_matches(name, list(_CARDS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} `python -m models --list` shows all {len(_CARDS)} models.")


def published_top1(name: str) -> tuple[float, str] | None:
    """(top-1 %, source) as published for ``name``'s weights, if known."""
    weights = model_card(name).weights
    return (weights.top1, weights.source) if weights else None


def zoo_table(pattern: str = "*") -> str:
    """The README's zoo table (Markdown) from the cards."""
    rows = ["| model | family | params | GMACs@224 | published top-1 (source) |", "|---|---|---|---|---|"]
    for name in list_models(pattern):
        card, top1 = _CARDS[name], published_top1(name)
        rows.append(f"| {name} | {card.family} | {card.params:,} | {card.gmacs:.2f} | "
                    f"{f'{top1[0]:.2f} ({top1[1]})' if top1 else '-'} |")
    return "\n".join(rows)


def create_model(name: str, pretrained: bool | str = False, num_classes: int = 1000, in_channels: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 checkpoint_path: str | Checkpoint | None = None, head: str = "replace", **kwargs: Any) -> nn.Cell:
    """Build a registered model, optionally with weights; ``model.pretrained_cfg`` (a
    :class:`models.weights.WeightsInfo`) says where they came from and their eval transform.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the released ImageNet weights of ``name`` (downloaded and verified), or
            ``"timm:<model>.<tag>"`` / ``"timm:<file>.safetensors"``: timm's (:mod:`models.timm_hub`).
        num_classes: classifier outputs (0: no classifier, the model returns pooled features).
        in_channels: input image channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate of the last block.
        checkpoint_path: a MindSpore checkpoint to load (ours, mindcv's or mindspore/models'
            layout; the model is built the way the source network computes, e.g. with 'same'
            padding for mindspore/models' ResNet-50), or one already read with
            :func:`models.checkpoint.open_checkpoint`.
        head: a checkpoint head of other classes than ``num_classes``: ``"replace"`` it by a fresh
            one (logged), or ``"refuse"`` (WeightsError). 1001-class heads are cut to 1000 either way.
        **kwargs: further trunk arguments, e.g. ``features_only=True`` or ``pool_pad="pad"``.
    """
    card = model_card(name)
    if pretrained and checkpoint_path:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    checkpoint = None
    timm_source = pretrained if is_timm_source(pretrained) else None
    if timm_source:
        checkpoint_path = timm_checkpoint(timm_source, name, card.timm, cache_dir(), card.build)
        pretrained = False
    if checkpoint_path:
        checkpoint = open_checkpoint(checkpoint_path) if isinstance(checkpoint_path, str) else checkpoint_path
        kwargs = _built_like_source(name, checkpoint, kwargs)
    build = {k: kwargs[k] for k in BUILD_SETTINGS if k in kwargs}
    model = card.build(num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate,
               drop_path_rate=drop_path_rate, **kwargs)
    entry = card.weights
    info = WeightsInfo(eval_transform=entry.eval_transform if entry else EvalTransform())
    if pretrained:
        load_pretrained(model, name, entry, head=head)
        info = dataclasses.replace(info, source=entry.url, top1=entry.top1)
    elif checkpoint is not None:
        report = load_weights(model, checkpoint, head=head)
        # said at INFO where something was done to the weights (names mapped, head fitted, EMA taken)
        level = logging.INFO if report.renamed or report.notes else logging.DEBUG
        logger.log(level, "%s: weights from %s: %s", name, checkpoint.path, report.table())
        info = WeightsInfo.of_checkpoint(checkpoint, info.eval_transform)
        if timm_source:
            info = dataclasses.replace(info, source=timm_source)
    model.pretrained_cfg = dataclasses.replace(info, build=tuple(sorted(build.items())))
    return model


def _built_like_source(name: str, checkpoint: Checkpoint, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus the build settings (padding) the checkpoint's weights were computed with, so
    that logits match; a setting the caller gave wins, and the log says so."""
    origin, build = build_settings(checkpoint)
    kwargs = dict(kwargs)
    for key, value in build.items():
        if key in kwargs and kwargs[key] != value:
            logger.warning("%s: %s=%r as given, although %s computes with %s=%r: outputs will differ from its",
                           name, key, kwargs[key], origin, key, value)
        kwargs.setdefault(key, value)
    if build:
        logger.info("%s: built with %s to match %s (%s)", name, ", ".join(f"{k}={kwargs[k]!r}" for k in build),
                    origin, checkpoint.path)
    return kwargs
