"""Model registry and factory in mindcv's style: ``register_model``, ``list_models``, ``create_model``."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from typing import Any, Callable

from mindspore import nn

from resgarden.base.specs import EvalTransform

from .pretrained import PRETRAINED, load_pretrained
from .weights import Checkpoint, WeightsInfo, build_settings, load_weights, open_checkpoint

logger = logging.getLogger("resgarden")
BUILD_SETTINGS = ("conv_pad", "pool_pad")  # how a model computes, recorded with the weights trained in it

_MODELS: dict[str, Callable[..., nn.Cell]] = {}
_FAMILIES: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Cell]) -> Callable[..., nn.Cell]:
    """Register a variant function under its own name; its module names the family."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    _FAMILIES[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. ``"res2net50*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_family(name: str) -> str:
    """The module (resnet, res2net, resnest) that defines ``name``."""
    return _FAMILIES[check_model_name(name)]


def check_model_name(name: str) -> str:
    """Return ``name`` if registered, else raise ValueError naming the closest registered models."""
    if name in _MODELS:
        return name
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} `python -m models --list` shows all {len(_MODELS)} models.")


def create_model(name: str, pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 checkpoint_path: str | Checkpoint | None = None, head: str = "replace", **kwargs: Any) -> nn.Cell:
    """Build a registered model, optionally with weights; ``model.pretrained_cfg`` (a
    :class:`models.weights.WeightsInfo`) says where they came from and their eval transform.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the released ImageNet weights of ``name`` (downloaded and verified).
        num_classes: classifier outputs (0: no classifier, the model returns pooled features).
        in_channels: input image channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate of the last block.
        checkpoint_path: a MindSpore checkpoint to load (ours, mindcv's or mindspore/models'
            layout; the model is built the way the source network computes, e.g. with 'same'
            padding for mindspore/models' ResNet-50), or one already read with
            :func:`models.weights.open_checkpoint`.
        head: a checkpoint head of other classes than ``num_classes``: ``"replace"`` it by a fresh
            one (logged), or ``"refuse"`` (WeightsError). 1001-class heads are cut to 1000 either way.
        **kwargs: further trunk arguments, e.g. ``features_only=True`` or ``pool_pad="pad"``.
    """
    fn = _MODELS[check_model_name(name)]
    if pretrained and checkpoint_path:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    checkpoint = None
    if checkpoint_path:
        checkpoint = open_checkpoint(checkpoint_path) if isinstance(checkpoint_path, str) else checkpoint_path
        kwargs = _built_like_source(name, checkpoint, kwargs)
    build = {k: kwargs[k] for k in BUILD_SETTINGS if k in kwargs}
    model = fn(num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate,
               drop_path_rate=drop_path_rate, **kwargs)
    entry = PRETRAINED.get(name)
    info = WeightsInfo(eval_transform=entry.eval_transform if entry else EvalTransform())
    if pretrained:
        load_pretrained(model, name, head=head)
        info = dataclasses.replace(info, source=entry.url, top1=entry.top1)
    elif checkpoint is not None:
        report = load_weights(model, checkpoint, head=head)
        # said at INFO where something was done to the weights (names mapped, head fitted, EMA taken)
        level = logging.INFO if report.renamed or report.notes else logging.DEBUG
        logger.log(level, "%s: weights from %s: %s", name, checkpoint.path, report.table())
        info = WeightsInfo.of_checkpoint(checkpoint, info.eval_transform)
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
