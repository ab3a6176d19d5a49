"""Detection training pieces the loop dispatches to: loader, target encoding, loss, COCO mAP, figures.

Targets follow TTFNet (a CenterNet that trains fast): each object puts a Gaussian on the class
heatmap at its centre cell (sigma from its size) and supervises the box distances at the cells
around its centre, weighted by that Gaussian, with a GIoU loss. mAP comes from pycocotools'
COCOeval, the reference implementation (torchmetrics' MeanAveragePrecision needs torchvision,
which is not installable beside this torch).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalelab.config.specs import AugmentSpec
from scalelab.data.dataset import Split
from scalelab.data.loader import TensorLoader
from scalelab.errors import ConfigError
from scalelab.models.detection import box_area, decode, ltrb_to_boxes
from scalelab.train.runtime import Runtime

GAUSSIAN_ALPHA = 0.54  # TTFNet: sigma = alpha * side / 6 (heatmap and regression area)
MIN_SIGMA = 0.3  # cells; a 6 px object at stride 4 still gets a (narrow) Gaussian
BOX_WEIGHT = 5.0  # TTFNet's weight of the GIoU term against the heatmap focal loss
REGRESSION_FLOOR = 0.05  # cells whose Gaussian is below this do not regress the box


@dataclass
class BoxTargets:
    """The boxes of one batch: per image ``boxes`` (m_i, 4) xyxy px and ``labels`` (m_i,)."""

    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_ids: torch.Tensor  # (B,) index of each image in its split (unique across workers)
    image_size: int

    def __len__(self) -> int:
        return len(self.boxes)


class DetectionLoader(TensorLoader):
    """TensorLoader whose batches are ``(x, BoxTargets)``; horizontal flips move the boxes too."""

    def __init__(self, split: Split, batch_size: int, mean, std, *, augment: AugmentSpec | None = None, **kw):
        if not split.has_boxes:
            raise ConfigError(
                "model.task is 'detection' but the dataset has no boxes; use data.kind scenes or coco"
            )
        if augment is not None and (augment.crop_padding or augment.random_erasing):
            raise ConfigError(
                "detection supports only data.augment.hflip; crop_padding and random_erasing would "
                "move or hide objects without moving their boxes: set them to 0"
            )
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


# ---------------------------------------------------------------------------- targets and loss


def encode_targets(
    targets: BoxTargets, num_classes: int, h: int, w: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmap (B, K, h, w), box target per cell (B, h, w, 4), regression weight (B, h, w).

    Each object's regression weights sum to 1, so small objects count as much as large ones;
    where objects' areas overlap the smaller object owns the cell.
    """
    b = len(targets)
    dev = targets.boxes[0].device if b else torch.device("cpu")
    heat = torch.zeros(b * num_classes, h, w, device=dev)
    box_t = torch.zeros(b, h, w, 4, device=dev)
    weight = torch.zeros(b, h, w, device=dev)
    counts = [len(x) for x in targets.boxes]
    if not sum(counts):
        return heat.view(b, num_classes, h, w), box_t, weight
    boxes = torch.cat(targets.boxes).float()  # (M, 4)
    labels = torch.cat(targets.labels).long()
    owner = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(counts, device=dev))
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2) px
    peak = (centre / stride).floor().long()
    peak[:, 0].clamp_(0, w - 1)
    peak[:, 1].clamp_(0, h - 1)
    sigma = ((boxes[:, 2:] - boxes[:, :2]) * GAUSSIAN_ALPHA / 6 / stride).clamp(min=MIN_SIGMA)  # (M, 2)
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    dx = (xs - peak[:, 0].view(-1, 1, 1)) / sigma[:, 0].view(-1, 1, 1)
    dy = (ys - peak[:, 1].view(-1, 1, 1)) / sigma[:, 1].view(-1, 1, 1)
    gauss = torch.exp(-(dx**2 + dy**2) / 2)  # (M, h, w), exactly 1 at each peak
    heat.scatter_reduce_(0, (owner * num_classes + labels).view(-1, 1, 1).expand_as(gauss), gauss, "amax")

    cx = (xs + 0.5) * stride
    cy = (ys + 0.5) * stride
    inside_x = (cx > boxes[:, 0:1, None]) & (cx < boxes[:, 2:3, None])  # (M, 1, w)
    inside = inside_x & (cy > boxes[:, 1:2, None]) & (cy < boxes[:, 3:4, None])  # (M, h, w)
    region = (inside & (gauss > REGRESSION_FLOOR)) | (gauss == 1)  # the peak cell always regresses
    area = box_area(boxes)
    cost = torch.where(region, area.view(-1, 1, 1), torch.full_like(gauss, float("inf")))
    smallest = torch.full((b, h, w), float("inf"), device=dev)
    smallest.scatter_reduce_(0, owner.view(-1, 1, 1).expand_as(cost), cost, "amin")
    owned = region & (cost == smallest[owner])
    w_obj = gauss * owned
    w_obj = w_obj / w_obj.sum((1, 2), keepdim=True).clamp(min=1e-9)
    m, yy, xx = owned.nonzero(as_tuple=True)
    box_t[owner[m], yy, xx] = boxes[m]
    weight[owner[m], yy, xx] = w_obj[m, yy, xx]
    return heat.view(b, num_classes, h, w), box_t, weight


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed (normalise by the object count)."""
    pos = target == 1
    pos_loss = F.logsigmoid(logits) * (1 - logits.sigmoid()) ** 2
    neg_loss = F.logsigmoid(-logits) * logits.sigmoid() ** 2 * (1 - target) ** 4
    return -(pos_loss[pos].sum() + neg_loss[~pos].sum())


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU of matched xyxy boxes (n, 4) -> (n,)."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1)
    return 1 - (iou - (hull - union) / hull.clamp(min=1e-6))


def detection_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: BoxTargets) -> torch.Tensor:
    """Heatmap focal loss + ``BOX_WEIGHT`` x weighted GIoU, both per object."""
    heatmap, ltrb = outputs[0].float(), outputs[1].float()  # (B, K, h, w), (B, 4, h, w)
    _, k, h, w = heatmap.shape
    stride = max(1, round(targets.image_size / h))
    heat_t, box_t, weight = encode_targets(targets, k, h, w, stride)
    n_obj = max(1, sum(len(b) for b in targets.boxes))
    pos = weight > 0
    pred = ltrb_to_boxes(ltrb, stride)[pos]  # (P, 4)
    box_loss = (giou_loss(pred, box_t[pos]) * weight[pos]).sum()
    # ltrb.sum() * 0: the box head always joins the graph (DDP needs a gradient for every parameter)
    return (focal_loss(heatmap, heat_t) + BOX_WEIGHT * box_loss) / n_obj + ltrb.sum() * 0


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class DetectionEvalResult:
    """COCO metrics of one split. ``accuracy`` is mAP@0.5, so what ranks checkpoints and gates
    promotion by ``*_acc`` works unchanged for detection."""

    loss: float
    map50: float
    map: float
    map75: float
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    per_class_ap50: list[float | None] = field(default_factory=list)
    images: int = 0

    @property
    def accuracy(self) -> float:
        return self.map50

    @property
    def per_class_accuracy(self) -> list[float | None]:
        return self.per_class_ap50

    @property
    def confusion(self) -> np.ndarray:
        return np.zeros((0, 0), dtype=np.int64)  # no confusion matrix for detection

    def as_metrics(self, prefix: str) -> dict[str, float]:
        values = {
            "loss": self.loss,
            "acc": self.map50,
            "map50": self.map50,
            "map": self.map,
            "map75": self.map75,
            "map_small": self.map_small,
            "map_medium": self.map_medium,
            "map_large": self.map_large,
        }
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: DetectionLoader, num_classes: int, runtime: Runtime):
    """Loss and COCO mAP over a split (all workers' shards gathered; padded repeats dropped)."""
    model.eval()
    stride = getattr(model, "module", model).stride
    loss_sum, seen = 0.0, 0
    records: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for x, targets in loader:
        with runtime.autocast():
            outputs = model(x)
        loss_sum += detection_loss(outputs, targets).item() * len(targets)
        seen += len(targets)
        for i, det in zip(
            targets.image_ids.tolist(), decode(outputs[0].float(), outputs[1].float(), stride), strict=True
        ):
            records[i] = (
                det["boxes"].cpu().numpy(),
                det["scores"].cpu().numpy(),
                det["labels"].cpu().numpy(),
            )
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (records, loss_sum, seen))
        records = {k: v for part in gathered for k, v in part[0].items()}
        loss_sum, seen = sum(p[1] for p in gathered), sum(p[2] for p in gathered)
    ids = sorted(records)
    gts = [(loader.image_boxes[i].cpu().numpy(), loader.image_labels[i].cpu().numpy()) for i in ids]
    stats = coco_map(gts, [records[i] for i in ids], num_classes)
    return DetectionEvalResult(loss=loss_sum / max(1, seen), images=len(ids), **stats)


def coco_map(
    gts: list[tuple[np.ndarray, np.ndarray]],
    dets: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
) -> dict[str, Any]:
    """COCO bbox metrics with pycocotools. gts: per image (boxes xyxy, labels); dets: (boxes,
    scores, labels). Areas are COCO's absolute ones (small < 32^2 px); None where a size is absent."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, rows = [], [], []
    for img_id, ((gb, gl), (db, ds, dl)) in enumerate(zip(gts, dets, strict=True), start=1):
        images.append({"id": img_id})
        for b, lab in zip(gb.tolist(), gl.tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(lab),
                    "iscrowd": 0,
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                }
            )
        for b, s, lab in zip(db.tolist(), ds.tolist(), dl.tolist(), strict=True):
            rows.append([img_id, b[0], b[1], b[2] - b[0], b[3] - b[1], s, lab])
    empty = {"map50": 0.0, "map": 0.0, "map75": 0.0, "map_small": None, "map_medium": None, "map_large": None}
    if not anns:
        return {**empty, "per_class_ap50": [None] * num_classes}
    if not rows:
        return {**empty, "per_class_ap50": [0.0] * num_classes}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress lines
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k} for k in range(num_classes)],
        }
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(np.array(rows, dtype=np.float64)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(v) for v in ev.stats]  # AP, AP50, AP75, AP_s, AP_m, AP_l, AR...
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, all areas, 100 dets
    per_class = [
        float(prec[:, k][prec[:, k] > -1].mean()) if (prec[:, k] > -1).any() else None
        for k in range(num_classes)
    ]
    size = lambda v: None if v < 0 else v  # noqa: E731  (-1: no object of that size)
    return {
        "map50": max(s[1], 0.0),
        "map": max(s[0], 0.0),
        "map75": max(s[2], 0.0),
        "map_small": size(s[3]),
        "map_medium": size(s[4]),
        "map_large": size(s[5]),
        "per_class_ap50": per_class,
    }


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
    from scalelab.models.detection import predict_boxes

    n = min(count, len(split))
    if n == 0:
        return []
    preds = predict_boxes(getattr(model, "module", model), list(split.x[:n]), meta)
    truths = [
        (split.boxes[split.box_image_index == i], split.box_labels[split.box_image_index == i])
        for i in range(n)
    ]
    path = draw_predictions(
        split.x[:n], preds, list(meta["dataset"]["classes"]), Path(out_dir) / "predictions.png", truths
    )
    return [path]
