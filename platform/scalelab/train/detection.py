"""Detection training pieces: the loader (boxes beside the images) and prediction figures.

Targets, loss (``models/detection_loss.py``) and COCO mAP (``artifacts/evaluate.py``) live below
training, so a bundle is evaluated exactly as training evaluated it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scalelab.artifacts.bundle import unwrap
from scalelab.artifacts.predictor import predict_boxes
from scalelab.config.specs import AugmentSpec
from scalelab.data.dataset import Split
from scalelab.data.loader import TensorLoader
from scalelab.errors import ConfigError
from scalelab.models.detection_loss import BoxTargets


def detection_augment(augment: AugmentSpec | None) -> AugmentSpec | None:
    """The recipe's augmentation, refused unless detection-safe (boxes move with flips only)."""
    if augment is not None and (augment.crop_padding or augment.random_erasing or augment.rescale):
        raise ConfigError(
            "detection supports only data.augment.hflip; crop_padding, random_erasing and rescale "
            "would move or hide objects without moving their boxes: set them to 0 / null"
        )
    return augment


class DetectionLoader(TensorLoader):
    """TensorLoader whose batches are ``(x, BoxTargets)``; horizontal flips move the boxes too."""

    def __init__(self, split: Split, batch_size: int, mean, std, *, augment: AugmentSpec | None = None, **kw):
        if not split.has_boxes:
            raise ConfigError(
                "model.task is 'detection' but the dataset has no boxes; use data.kind scenes or coco"
            )
        augment = detection_augment(augment)
        self.flip = bool(augment is not None and augment.hflip and kw.get("shuffle"))
        super().__init__(split, batch_size, mean, std, augment=None, **kw)
        self.y = torch.arange(len(split))  # the parent yields image indices; boxes are looked up
        order = np.argsort(split.box_image_index, kind="stable")
        starts = np.searchsorted(split.box_image_index[order], np.arange(len(split) + 1))
        boxes, labels = torch.from_numpy(split.boxes[order]), torch.from_numpy(split.box_labels[order])
        self.image_boxes = [boxes[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self.image_labels = [labels[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self.image_size = int(split.x.shape[2])

    def __iter__(self):
        for x, idx in super().__iter__():
            ids = idx.cpu()
            boxes = [self.image_boxes[i].clone() for i in ids.tolist()]
            if self.flip:
                flip = torch.rand(len(ids), generator=self.generator) < 0.5
                x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
                for b, f in zip(boxes, flip.tolist(), strict=True):
                    if f:
                        b[:, [0, 2]] = self.image_size - b[:, [2, 0]]
            dev = x.device
            yield (
                x,
                BoxTargets(
                    [b.to(dev) for b in boxes],
                    [self.image_labels[i].to(dev) for i in ids.tolist()],
                    ids,
                    self.image_size,
                ),
            )


# ------------------------------------------------------------------------------------- figures


def draw_predictions(
    images: np.ndarray,
    predictions: list[dict[str, Any]],
    classes: list[str],
    path: str | Path,
    truths: list[tuple[np.ndarray, np.ndarray]] | None = None,
    min_score: float = 0.3,
) -> Path:
    """A grid of images (N, H, W, C) uint8: predicted boxes in red with 'label score', true in green."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def rect(b, colour: str) -> Rectangle:  # imshow centres pixel j at j: its left edge is j - 0.5
        return Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec=colour, lw=1)

    for i, (ax, img) in enumerate(zip(axes.flat, images, strict=False)):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        for b in truths[i][0] if truths is not None else []:
            ax.add_patch(rect(b, "lime"))
        pred = predictions[i]
        for b, lab, s in zip(pred["boxes"], pred["labels"], pred["scores"], strict=True):
            if s >= min_score:
                ax.add_patch(rect(b, "red"))
                ax.text(b[0] - 0.5, b[1] - 0.5, f"{lab} {s:.2f}", color="yellow", fontsize=7, va="bottom")
    fig.suptitle(f"predictions (red, score >= {min_score:.2f}) and truth (green)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_prediction_images(
    model: nn.Module, split: Split, meta: dict[str, Any], out_dir: str | Path, count: int = 8
) -> list[Path]:
    """The first ``count`` images of a split with predicted and true boxes, for tracking artifacts."""
    n = min(count, len(split))
    if n == 0:
        return []
    preds = predict_boxes(unwrap(model), list(split.x[:n]), meta)
    truths = [
        (split.boxes[split.box_image_index == i], split.box_labels[split.box_image_index == i])
        for i in range(n)
    ]
    path = draw_predictions(
        split.x[:n], preds, list(meta["dataset"]["classes"]), Path(out_dir) / "predictions.png", truths
    )
    return [path]
