"""timm's released weights by name: ``pretrained="timm:<model>.<tag>"`` (``--pretrained=timm:...``),
e.g. ``timm:res2net50_14w_8s.in1k``, the only released weights of several of our variants.

The ``model.safetensors`` of the Hugging Face repository ``timm/<model>.<tag>`` comes from the local
Hugging Face cache (``$HF_HOME``, ``$HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` is honoured), or from the hub
when it can be reached; ``timm:/path/to/weights.safetensors`` names a file instead. The weights are
converted once (:func:`models.torch_weights.save_converted`, which records PyTorch-style pool padding) into
``<weights cache>/timm/`` under the SHA-256 of the source file, and that checkpoint is loaded. Where torch
and timm can be imported, the conversion is checked first: timm's own model with the same weights must
give our logits on a fixed input (:func:`models.torch_weights.check_against_timm`), else nothing is cached.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Callable

from mindspore import nn

from .checkpoint import WeightsError
from .torch_weights import TORCH_BUILD, read_torch_weights, save_converted, source_classes

PREFIX = "timm:"
FILENAME = "model.safetensors"


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
        save_converted(build(num_classes=source_classes(state), **TORCH_BUILD), model, state, out, path, timm_name)
    return out
