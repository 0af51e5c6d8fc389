"""`python -m models --list | --summary`: the registered models, their size and cost."""
from __future__ import annotations

import argparse
import sys

from . import create_model, list_models, model_family
from .profile import count_macs, count_params
from .registry import published_top1


def summary_rows(pattern: str, image_size: int) -> list[tuple[str, str, int, float, str]]:
    """(name, family, params, GMACs, published top-1 with source) per matching model."""
    rows = []
    for name in list_models(pattern):
        model = create_model(name)
        top1 = published_top1(name)
        rows.append((name, model_family(name), count_params(model), count_macs(model, image_size) / 1e9,
                     f"{top1[0]:.2f} ({top1[1]})" if top1 else "-"))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the registered model names")
    action.add_argument("--summary", action="store_true",
                        help="build each model and print params, GMACs and published top-1")
    parser.add_argument("--pattern", default="*", help="shell-style name filter, e.g. 'res2net50*'")
    parser.add_argument("--image-size", type=int, default=224, help="input size for GMACs (default 224)")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; `python -m models --list` shows them all", file=sys.stderr)
        return 2
    if args.list:
        for name in names:
            print(f"{name:20s} {model_family(name)}")
        return 0
    header = ("model", "family", "params", f"GMACs@{args.image_size}", "published top-1 (source)")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print(f"{header[0]:20s} {header[1]:8s} {header[2]:>12s} {header[3]:>11s}  {header[4]}")
    for name, family, params, gmacs, top1 in summary_rows(args.pattern, args.image_size):
        if args.markdown:
            print(f"| {name} | {family} | {params:,} | {gmacs:.2f} | {top1} |")
        else:
            print(f"{name:20s} {family:8s} {params:12,d} {gmacs:11.2f}  {top1}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
