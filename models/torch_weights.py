"""PyTorch (timm / torchvision layout) weights as ours: reading them safely, renaming them to our
parameter names, checking them against timm's own model where timm is installed, and writing them as
a checkpoint that records how the model computes. Used by
``python -m models.convert`` (:mod:`models.convert`) and timm's weights by name (:mod:`models.timm_hub`).

``.safetensors`` files are read without PyTorch; ``.pth``/``.pt``/``.bin`` only through
``torch.load(weights_only=True)`` when PyTorch is installed, never by a bare unpickle.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Mapping

import mindspore as ms
import numpy as np
from mindspore import nn

from resgarden.base.errors import UserError

from .checkpoint import WeightsError, save_atomic
from .weights import load_weights

logger = logging.getLogger("resgarden")
TOLERANCE = 1e-4  # of the logit scale in check_against_timm: float32 summation order, not a wrong weight
# PyTorch module names -> ours, then BN tensor names -> MindSpore's.
TORCH_MODULE_MAP = ((r"^fc\.", "classifier."), (r"\.downsample\.", ".down_sample."))
TORCH_BN_MAP = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


class ConversionError(UserError):
    """Weights that cannot be read or mapped; the message is for the user."""


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """name -> float32 array from a .safetensors (no torch needed) or a torch .pth/.pt/.bin file."""
    if not os.path.isfile(path):
        raise ConversionError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"cannot read {path}: {exc}") from None
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{path} is a PyTorch pickle: install torch to read it safely, or convert it "
                                  "to .safetensors") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
    raise ConversionError(f"unsupported weights format: {path} (use .safetensors, .pth, .pt or .bin)")


def torch_to_ours(state: Mapping[str, np.ndarray], our_names: set[str]) -> dict[str, np.ndarray]:
    """Rename a timm/torchvision state dict to our parameter names; drop BN step counters.

    Raises ConversionError listing the tensors that match no parameter of ours.
    """
    out, unmatched = {}, []
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        module, _, tensor = name.rpartition(".")
        path = module + "."
        for pattern, repl in TORCH_MODULE_MAP:
            path = re.sub(pattern, repl, path)
        module = path[:-1]
        candidates = [f"{module}.{tensor}"] + ([f"{module}.{TORCH_BN_MAP[tensor]}"] if tensor in TORCH_BN_MAP else [])
        target = next((c for c in candidates if c in our_names), None)
        if target is None:
            unmatched.append(name)
        else:
            out[target] = value
    if unmatched:
        raise ConversionError(f"{len(unmatched)} tensors match no parameter of the model, e.g. {unmatched[:5]}")
    return out


TORCH_BUILD = {"pool_pad": "pad"}  # how PyTorch's networks compute: the model to convert into is built so


def source_classes(state: Mapping[str, np.ndarray]) -> int:
    """The classes of a PyTorch state dict's classifier (``fc``), 1000 without one."""
    return int(state["fc.weight"].shape[0]) if "fc.weight" in state else 1000


def save_converted(model: nn.Cell, model_name: str, state: Mapping[str, np.ndarray], out: str, source: str,
                   timm_name: str) -> str:
    """Load ``state`` (PyTorch names) strictly into ``model`` (built with :data:`TORCH_BUILD` and the
    source's classes), check it against timm's ``timm_name`` (:func:`check_against_timm`, logged; it
    raises to refuse), and write it to ``out`` with the model, its classes, the source file and
    TORCH_BUILD recorded, so that whoever loads it builds the model that way; returns the load report."""
    mapped = torch_to_ours(state, set(model.parameters_dict()))
    report = load_weights(model, mapped)  # strict: every parameter present with the right shape
    logger.info("%s from %s: %s", model_name, os.path.basename(source), check_against_timm(model, timm_name, state))
    save_atomic(model, out, meta=dict(model=model_name, num_classes=source_classes(state), build=dict(TORCH_BUILD),
                                      converted_from=os.path.basename(source)))
    return report.table()


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
