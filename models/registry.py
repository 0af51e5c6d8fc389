"""Model registry and factory in mindcv's style: ``register_model``, ``list_models``, ``create_model``."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

from mindspore import nn

from .pretrained import load_pretrained
from .weights import load_weights

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
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, checkpoint_path: str | None = None,
                 **kwargs: Any) -> nn.Cell:
    """Build a registered model, optionally with weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the released ImageNet weights of ``name`` (downloaded and verified);
            with another ``num_classes`` the classifier is left freshly initialised.
        num_classes: classifier outputs (0: no classifier, the model returns pooled features).
        in_channels: input image channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate of the last block.
        checkpoint_path: a MindSpore checkpoint to load (ours or mindcv's layout).
        **kwargs: further trunk arguments, e.g. ``features_only=True`` or ``pool_pad="pad"``.
    """
    fn = _MODELS[check_model_name(name)]
    if pretrained and checkpoint_path:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    model = fn(num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate,
               drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        load_pretrained(model, name)
    elif checkpoint_path:
        load_weights(model, checkpoint_path)
    return model
