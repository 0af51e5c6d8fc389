"""Training curves: loss and accuracy per epoch from metrics.jsonl, as a PNG."""
from __future__ import annotations

import json

from .atomic import atomic_path


def plot_metrics(metrics_path: str, png_path: str) -> str:
    """Draw train/val loss and val top-1/top-5 per epoch; returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    epochs = [r["epoch"] for r in records]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train")
    val = [r for r in records if "val_loss" in r]
    if val:
        loss_axis.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], marker="o", label="val")
        acc_axis.plot([r["epoch"] for r in val], [r["val_top1"] for r in val], marker="o", label="top-1")
        acc_axis.plot([r["epoch"] for r in val], [r["val_top5"] for r in val], marker="o", label="top-5")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=100)
    finally:
        plt.close(figure)
    return png_path
