"""Training curves: loss and accuracy per epoch from metrics.jsonl, as a PNG."""
from __future__ import annotations

import json

from resgarden.base.atomic import atomic_path

LOG_SCALE_SPREAD = 30.0  # losses spanning more than this factor are drawn on a log axis


def needs_log_scale(losses: list[float]) -> bool:
    """Whether the loss panel needs a log axis: positive losses spanning more than LOG_SCALE_SPREAD."""
    positive = [v for v in losses if v > 0]
    return bool(positive) and max(positive) > LOG_SCALE_SPREAD * min(positive)


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
    log_scale = needs_log_scale([r["train_loss"] for r in records] + [r["val_loss"] for r in val])
    if log_scale:  # one early outlier (a first epoch's validation loss) would flatten the rest
        loss_axis.set_yscale("log")
    loss_axis.set(xlabel="epoch", ylabel="loss (log scale)" if log_scale else "loss",
                  title="loss (log scale)" if log_scale else "loss")
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
