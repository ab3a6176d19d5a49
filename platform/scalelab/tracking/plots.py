"""Training curves and confusion matrix as PNG files (matplotlib's Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy per epoch; a resumed run shows as a dashed line where it picked up."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    if any("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h.get("val_loss", np.nan) for h in history], marker="o", label="val loss")
    ax_acc.plot(epochs, [h.get("train_acc", np.nan) for h in history], marker="o", label="train acc")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], marker="o", label="val acc")
    for resumed in sorted({int(h.get("resumed_from", 0)) for h in history} - {0}):
        for ax in (ax_loss, ax_acc):
            ax.axvline(resumed + 0.5, color="grey", linestyle="--", linewidth=1)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusion_matrix(confusion: Any, classes: list[str], path: str | Path) -> Path:
    """Rows: true class, columns: predicted class; counts written in the cells."""
    plt = _pyplot()
    conf = np.asarray(confusion)
    k = len(conf)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(conf, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title="test confusion matrix")
    ax.set_xticklabels(classes, rotation=90 if k > 12 else 0)
    ax.set_yticklabels(classes)
    if k <= 30:
        top = conf.max() or 1
        for i in range(k):
            for j in range(k):
                if conf[i, j]:
                    color = "white" if conf[i, j] > top / 2 else "black"
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
