"""Evaluation of a model: one implementation for training, `scalelab evaluate`, search and the gate.

``evaluate_model`` scores any stream of normalised batches: classifiers get loss, accuracy,
per-class accuracy and a confusion matrix; detectors get loss and COCO mAP (pycocotools'
COCOeval, the reference implementation). Under torch.distributed every rank's shard is summed
or gathered, so N workers report what one would. ``evaluate_predictor`` scores a loaded bundle on
uint8 images, normalised with the bundle's own statistics (``artifacts.preprocess``), in the
bundle's precision unless a runtime is given.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalelab.artifacts.bundle import unwrap
from scalelab.artifacts.hardware import Runtime
from scalelab.artifacts.predictor import Predictor
from scalelab.artifacts.preprocess import normalise
from scalelab.models.detection import decode
from scalelab.models.detection_loss import BoxTargets, detection_loss


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # (K, K): rows true class, columns predicted
    probabilities: np.ndarray | None = None  # (N, K) in input order, when asked for (one process)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.accuracy}


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


class LabelledImages(Protocol):
    """What ``evaluate_predictor`` scores (``data.dataset.Split`` is one): uint8 images and labels."""

    x: np.ndarray  # (N, H, W, C) uint8
    y: np.ndarray  # (N,) class ids (detection: objects per image)
    boxes: np.ndarray | None  # detection: (M, 4) xyxy px, with box_labels (M,), box_image_index (M,)
    box_labels: np.ndarray | None
    box_image_index: np.ndarray | None


@dataclass
class Images:
    """A plain ``LabelledImages``: classifier test images and their labels."""

    x: np.ndarray
    y: np.ndarray
    boxes: np.ndarray | None = None
    box_labels: np.ndarray | None = None
    box_image_index: np.ndarray | None = None


def task_of(model: nn.Module) -> str:
    spec = getattr(unwrap(model), "spec", None)
    return getattr(spec, "task", "classification")


def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    num_classes: int,
    runtime: Runtime,
    keep_probabilities: bool = False,
) -> EvalResult | DetectionEvalResult:
    """Score normalised batches ``(x (B, C, H, W), y)``: y is class ids, or BoxTargets for a detector."""
    if task_of(model) == "detection":
        return _evaluate_detector(model, batches, num_classes, runtime)
    return _evaluate_classifier(model, batches, num_classes, runtime, keep_probabilities)


@torch.no_grad()
def _evaluate_classifier(model, batches, num_classes: int, runtime: Runtime, keep_probabilities: bool):
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    probs = []
    for x, y in batches:
        with runtime.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        pred = logits.argmax(1)
        conf += (
            torch.bincount(y * num_classes + pred, minlength=num_classes**2)
            .view(num_classes, num_classes)
            .double()
        )
        if keep_probabilities:
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(conf)
        dist.all_reduce(loss_sum)
    conf_np = conf.cpu().numpy().astype(np.int64)
    total = max(1, int(conf_np.sum()))
    per_class = (np.diag(conf_np) / np.maximum(conf_np.sum(1), 1)).round(6).tolist()
    return EvalResult(
        loss=float(loss_sum.item() / total),
        accuracy=float(np.trace(conf_np) / total),
        per_class_accuracy=per_class,
        confusion=conf_np,
        probabilities=(np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32))
        if keep_probabilities
        else None,
    )


@torch.no_grad()
def _evaluate_detector(model, batches, num_classes: int, runtime: Runtime) -> DetectionEvalResult:
    """Loss and COCO mAP over a split (all workers' shards gathered; padded repeats dropped)."""
    model.eval()
    stride = unwrap(model).stride
    loss_sum, seen = 0.0, 0
    # image id -> (true boxes, true labels, boxes, scores, labels)
    records: dict[int, tuple[np.ndarray, ...]] = {}
    for x, targets in batches:
        with runtime.autocast():
            outputs = model(x)
        loss_sum += detection_loss(outputs, targets).item() * len(targets)
        seen += len(targets)
        found = decode(outputs[0].float(), outputs[1].float(), stride)
        for i, tb, tl, det in zip(
            targets.image_ids.tolist(), targets.boxes, targets.labels, found, strict=True
        ):
            records[i] = (
                tb.cpu().numpy(),
                tl.cpu().numpy(),
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
    stats = coco_map([records[i][:2] for i in ids], [records[i][2:] for i in ids], num_classes)
    return DetectionEvalResult(loss=loss_sum / max(1, seen), images=len(ids), **stats)


def evaluate_predictor(
    predictor: Predictor,
    images: LabelledImages,
    runtime: Runtime | None = None,
    batch_size: int = 256,
    keep_probabilities: bool = False,
) -> EvalResult | DetectionEvalResult:
    """Score a loaded bundle on labelled uint8 images, normalised with the bundle's mean/std.

    ``runtime`` (device, autocast dtype, memory format) defaults to the predictor's own: the
    precision the bundle was trained in, where this hardware has it.
    """
    runtime = runtime or predictor.runtime
    model = predictor.model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = _labelled_batches(predictor, images, runtime, batch_size)
    return evaluate_model(model, batches, len(predictor.classes), runtime, keep_probabilities)


def _labelled_batches(
    predictor: Predictor, images: LabelledImages, runtime: Runtime, batch_size: int
) -> Iterator[tuple[torch.Tensor, Any]]:
    detection = predictor.task == "detection"
    if detection:
        if getattr(images, "boxes", None) is None:
            raise ValueError("a detector is evaluated on images with boxes (a detection split)")
        order = np.argsort(images.box_image_index, kind="stable")
        starts = np.searchsorted(images.box_image_index[order], np.arange(len(images.x) + 1))
        boxes = torch.from_numpy(np.asarray(images.boxes[order], dtype=np.float32))
        labels = torch.from_numpy(np.asarray(images.box_labels[order], dtype=np.int64))
    for start in range(0, len(images.x), batch_size):
        x = normalise(images.x[start : start + batch_size], predictor.input).to(runtime.device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ids = range(start, start + len(x))
        if not detection:
            yield (
                x,
                torch.from_numpy(np.asarray(images.y[start : start + batch_size], dtype=np.int64)).to(
                    runtime.device
                ),
            )
            continue
        yield (
            x,
            BoxTargets(
                [boxes[starts[i] : starts[i + 1]].to(runtime.device) for i in ids],
                [labels[starts[i] : starts[i + 1]].to(runtime.device) for i in ids],
                torch.arange(start, start + len(x)),
                int(images.x.shape[2]),
            ),
        )


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
