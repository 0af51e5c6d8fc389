"""Import PyTorch weights (timm / torchvision layout) into our models.

    python -m models.convert --model res2net50_14w_8s --src res2net50_14w_8s.safetensors --out r2n.ckpt

``.safetensors`` files are read without PyTorch; ``.pth``/``.pt``/``.bin`` only through
``torch.load(weights_only=True)`` when PyTorch is installed, never by a bare unpickle. timm and
torchvision pad their 3x3 pools PyTorch-style: the checkpoint records it (``meta.build``, written
by :func:`models.checkpoint.save_atomic`), so ``create_model(name, checkpoint_path=...)``, validate,
export and fine-tuning build the model that way by themselves.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import numpy as np

from resgarden.base.errors import UserError

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


def convert(model_name: str, src: str, out: str, num_classes: int | None = None) -> str:
    """Convert ``src`` into a MindSpore checkpoint ``out`` for ``model_name`` that records the
    model, its classes and how it computes (PyTorch-style pool padding); returns the load report."""
    from .checkpoint import save_atomic
    from .registry import check_model_name, create_model
    from .weights import load_weights

    try:
        check_model_name(model_name)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    state = read_torch_weights(src)
    classes = num_classes or (state["fc.weight"].shape[0] if "fc.weight" in state else 1000)
    model = create_model(model_name, num_classes=classes, pool_pad="pad")
    mapped = torch_to_ours(state, set(model.parameters_dict()))
    report = load_weights(model, mapped)  # strict: every parameter present with the right shape
    save_atomic(model, out, meta=dict(model=model_name, num_classes=classes, build=dict(model.pretrained_cfg.build),
                                      converted_from=os.path.basename(src)))
    return report.table()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="our model name (python -m models --list)")
    parser.add_argument("--src", required=True, help="timm/torchvision weights (.safetensors, .pth, .pt, .bin)")
    parser.add_argument("--out", required=True, help="MindSpore checkpoint to write")
    parser.add_argument("--num_classes", type=int, default=None, help="default: the size of the source's fc")
    return parser


def main(argv: list[str] | None = None) -> int:
    from resgarden.platform import apply_cpu_speed_guard

    apply_cpu_speed_guard()
    args = build_parser().parse_args(argv)
    from resgarden.base.runner import run

    def action() -> str:
        report = convert(args.model, args.src, args.out, args.num_classes)
        return (f"{report}\nwrote {args.out} (PyTorch-style pool padding recorded); load it with "
                f"create_model({args.model!r}, checkpoint_path=...) or --ckpt_path")

    return run("convert", action)


if __name__ == "__main__":
    sys.exit(main())
