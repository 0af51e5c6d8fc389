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
import sys

from .torch_weights import (
    TORCH_BUILD,
    ConversionError,
    read_torch_weights,
    save_converted,
    source_classes,
    torch_to_ours,
)

__all__ = ["ConversionError", "convert", "main", "read_torch_weights", "torch_to_ours"]


def convert(model_name: str, src: str, out: str, num_classes: int | None = None) -> str:
    """Convert ``src`` into a MindSpore checkpoint ``out`` for ``model_name`` that records the
    model, its classes and how it computes (PyTorch-style pool padding), checked against timm's twin
    of the model where torch and timm are installed; returns the load report."""
    from .registry import check_model_name, create_model, model_card

    try:
        check_model_name(model_name)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    state = read_torch_weights(src)
    model = create_model(model_name, num_classes=num_classes or source_classes(state), **TORCH_BUILD)
    return save_converted(model, model_name, state, out, src, model_card(model_name).timm)


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
