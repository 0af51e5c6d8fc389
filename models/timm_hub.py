"""timm's released weights by name: ``pretrained="timm:<model>.<tag>"`` (``--pretrained=timm:...``),
e.g. ``timm:res2net50_14w_8s.in1k``, the only released weights of several of our variants.

The ``model.safetensors`` of the Hugging Face repository ``timm/<model>.<tag>`` comes from the local
Hugging Face cache (``$HF_HOME``, ``$HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` is honoured), or from the hub
when it can be reached; ``timm:/path/to/weights.safetensors`` names a file instead. The weights are
converted once (:func:`models.torch_weights.save_converted`, which records PyTorch-style pool padding) into
``<weights cache>/timm/`` under the SHA-256 of the source file, and that checkpoint is loaded. Where torch
and timm can be imported, the conversion is checked first: timm's own model with the same weights must
give our logits on a fixed input (:func:`check_against_timm`), else nothing is cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from typing import Callable, Mapping

import mindspore as ms
import numpy as np
from mindspore import nn

from .checkpoint import WeightsError
from .torch_weights import TORCH_BUILD, read_torch_weights, save_converted, source_classes

PREFIX = "timm:"
FILENAME = "model.safetensors"
TOLERANCE = 1e-4  # of the logit scale: float32 summation order, not a wrong weight
logger = logging.getLogger("resgarden")


def is_timm_source(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained.startswith(PREFIX)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_file(repo: str) -> str:
    """The repository's weights file from the Hugging Face cache or hub; one WeightsError otherwise."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename=FILENAME)
    except Exception as exc:  # offline and not cached, no network, no such repository
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"timm weights {repo} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be "
                           f"downloaded ({reason}); download https://huggingface.co/{repo}/resolve/main/{FILENAME} "
                           f"and pass --pretrained=timm:/path/to/{FILENAME}") from None


def timm_checkpoint(source: str, model: str, timm_name: str, cache: str, build: Callable[..., nn.Cell]) -> str:
    """The MindSpore checkpoint converted from ``source`` (``timm:<name>.<tag>`` or
    ``timm:<file>.safetensors``) for our ``model`` (timm's ``timm_name``; ``build`` makes it), cached
    under ``cache``."""
    reference = source[len(PREFIX):]
    if reference.endswith(".safetensors"):
        if not os.path.isfile(reference):
            raise WeightsError(f"timm weights file not found: {reference}")
        path, label = reference, os.path.basename(reference)[: -len(".safetensors")]
    else:
        architecture = reference.split(".", 1)[0]
        if architecture != timm_name:
            raise WeightsError(f"{reference} are weights of timm's {architecture}; {model} is timm's {timm_name} "
                               f"(e.g. --pretrained=timm:{timm_name}.<tag>)")
        path, label = _hub_file(f"timm/{reference}"), reference
    digest = _sha256(path)[:8]
    out = os.path.join(cache, "timm", f"{model}-{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}-{digest}.ckpt")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        state = read_torch_weights(path)
        converted = build(num_classes=source_classes(state), **TORCH_BUILD)
        save_converted(converted, model, state, out, path, check=lambda net: check_against_timm(net, timm_name, state))
    return out


def check_against_timm(model: nn.Cell, timm_name: str, state: Mapping[str, np.ndarray]) -> str:
    """``model`` (the converted weights loaded) against timm's ``timm_name`` holding ``state``: their
    logits on a fixed input within :data:`TOLERANCE` of the logit scale, or a WeightsError; a line
    for the log. Without torch and timm in this environment it says so and checks nothing."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None:
        return "not checked against timm (torch and timm are not installed here)"
    import timm
    import torch

    reference = timm.create_model(timm_name, pretrained=False, num_classes=source_classes(state))
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    reference.eval()
    images = np.random.RandomState(0).randn(2, 3, 96, 96).astype(np.float32)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(images)).numpy()
    mode, training = ms.get_context("mode"), model.training
    ms.set_context(mode=ms.PYNATIVE_MODE)  # one call: not worth a graph compile
    try:
        ours = model.set_train(False)(ms.Tensor(images)).asnumpy()
    finally:
        ms.set_context(mode=mode)
        model.set_train(training)
    error = float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))
    if not error <= TOLERANCE:
        raise WeightsError(f"the converted weights do not give timm's {timm_name} logits (difference {error:.2e} of "
                           f"the logit scale, tolerance {TOLERANCE:g}): not cached")
    return f"checked against timm's {timm_name}: logits equal within {error:.1e} of their scale"
