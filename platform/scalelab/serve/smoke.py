"""The HTTP smoke test of a served model: held-out images posted as PNG files, as a client sends them.

Classifiers: the served top-1 accuracy next to the offline test accuracy. Detectors (scenes):
every answer is checked for shape and sanity (four finite coordinates inside the image with
x1 < x2 and y1 < y2, a known label, scores in [0, 1] highest first), and the served boxes are
scored against the true boxes: AP at IoU 0.5 (COCO's 101-point rule) and the hit rate (true
objects found by a box of the right class with IoU >= 0.5 and score >= ``HIT_SCORE``).

:func:`check_smoke` fails when an answer was an error or malformed, or when the served quality
falls clearly below the offline figure (``ACC_TOLERANCE`` / ``MAP_TOLERANCE``): the same model
behind HTTP must answer as it did offline.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
import time
from typing import Any

import numpy as np

from scalelab.errors import ScalelabError

HIT_SCORE = 0.3  # a box counts as a detection from this score on
IOU_MATCH = 0.5
ACC_TOLERANCE = 0.1  # served accuracy may lie this far below offline (a subset, PNG round trip)
MAP_TOLERANCE = 0.15  # served AP50 (subset, our AP) may lie this far below offline COCO mAP50


class SmokeFailed(ScalelabError):
    """The served model answered wrongly over HTTP."""


def png_base64(img: np.ndarray) -> str:
    """(H, W, C) uint8 -> base64 PNG, as a browser or client would upload it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def smoke_test(
    url: str,
    split,
    offline: dict[str, float],
    api_key: str | None = None,
    max_images: int = 200,
) -> dict[str, Any]:
    """POST up to ``max_images`` images of ``split`` (a :class:`scalelab.data.Split`) one by one to
    ``url``/v1/predict; latency, errors, and the quality as a client sees it (see the module doc).

    ``offline``: the model's own test metrics (``test_acc``, or ``test_map50`` for detectors).
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    n = min(max_images, len(split))
    latencies, answers, errors = [], [], 0
    with httpx.Client(timeout=30, headers=headers) as client:
        info = client.get(f"{url}/v1/model").json()
        for i in range(n):
            began = time.perf_counter()
            r = client.post(f"{url}/v1/predict", json={"images": [png_base64(split.x[i])]})
            latencies.append((time.perf_counter() - began) * 1000)
            answers.append(r.json() if r.status_code == 200 else None)
            errors += r.status_code != 200
    lat = sorted(latencies)
    result: dict[str, Any] = {
        "url": url,
        "task": info.get("task", "classification"),
        "images": n,
        "errors": errors,
        "latency_p50_ms": round(statistics.median(lat), 2),
        "latency_p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
        "served_version": str(info.get("version")),
    }
    if result["task"] == "detection":
        result.update(score_detections(split, answers, list(info.get("classes", []))))
        result["offline_test_map50"] = round(float(offline.get("test_map50", math.nan)), 4)
    else:
        hits = [
            a is not None and a["predictions"][0][0]["index"] == int(split.y[i])
            for i, a in enumerate(answers)
        ]
        result["served_test_acc"] = round(sum(hits) / max(1, n), 4)
        result["offline_test_acc"] = round(float(offline.get("test_acc", math.nan)), 4)
    return result


def check_smoke(result: dict[str, Any]) -> None:
    """Raise :class:`SmokeFailed` naming what went wrong (see the module doc)."""
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} of {result['images']} requests failed")
    problems += result.get("malformed", [])[:5]
    if result["task"] == "detection":
        served, offline = result["served_map50"], result["offline_test_map50"]
        if served < offline - MAP_TOLERANCE:
            problems.append(f"served AP50 {served:.3f} is far below the offline mAP50 {offline:.3f}")
    else:
        served, offline = result["served_test_acc"], result["offline_test_acc"]
        if served < offline - ACC_TOLERANCE:
            problems.append(f"served accuracy {served:.3f} is far below the offline {offline:.3f}")
    if problems:
        raise SmokeFailed(f"smoke test of {result['url']} failed: " + "; ".join(problems))


def smoke_summary(s: dict[str, Any]) -> str:
    """One line for the console: where it is served and how it answered."""
    where = f"served at {s['url']}/ (demo page) and {s['url']}/v1/predict: "
    if s.get("task") == "detection":
        quality = (
            f"AP50 over HTTP {s['served_map50']:.4f}, {s['hit_rate']:.0%} of objects found on {s['images']} "
            f"held-out scenes (offline mAP50 {s['offline_test_map50']:.4f})"
        )
    else:
        quality = (
            f"test accuracy over HTTP {s['served_test_acc']:.4f} on {s['images']} held-out images "
            f"(offline {s['offline_test_acc']:.4f})"
        )
    return f"{where}{quality}, p50 {s['latency_p50_ms']} ms"


# ------------------------------------------------------------------------------------- detection
def sanity_problems(
    det: dict[str, Any], width: int, height: int, classes: list[str], where: str
) -> list[str]:
    """What is wrong with one image's detections (empty when the answer is well formed)."""
    boxes, labels, ids, scores = det.get("boxes"), det.get("labels"), det.get("label_ids"), det.get("scores")
    if not all(isinstance(v, list) for v in (boxes, labels, ids, scores)):
        return [f"{where}: boxes, labels, label_ids and scores must all be lists"]
    if not len(boxes) == len(labels) == len(ids) == len(scores):
        return [f"{where}: {len(boxes)} boxes but {len(labels)} labels, {len(ids)} ids, {len(scores)} scores"]
    problems = []
    for k, (box, label, idx, score) in enumerate(zip(boxes, labels, ids, scores, strict=True)):
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            problems.append(f"{where} box {k}: {box} is not four finite numbers")
        elif not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            problems.append(f"{where} box {k}: {box} is not a box inside the {width}x{height} image")
        if not (0 <= idx < len(classes) and classes[idx] == label):
            problems.append(f"{where} box {k}: label {label!r} / id {idx} is not one of the model's classes")
        if not 0 <= score <= 1:
            problems.append(f"{where} box {k}: score {score} outside [0, 1]")
    if any(a < b for a, b in zip(scores, scores[1:], strict=False)):
        problems.append(f"{where}: scores are not sorted highest first")
    return problems


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (P, 4) with every box in ``b`` (G, 4), xyxy -> (P, G)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def average_precision(matched: list[tuple[float, bool]], num_truth: int) -> float:
    """COCO's 101-point interpolated AP from (score, is_true_positive) pairs of one class."""
    if num_truth == 0:
        return math.nan
    order = sorted(matched, key=lambda m: -m[0])
    tp = np.cumsum([m[1] for m in order], dtype=np.float64)
    fp = np.cumsum([not m[1] for m in order], dtype=np.float64)
    recall = tp / num_truth if len(order) else np.zeros(0)
    precision = tp / np.maximum(tp + fp, 1e-9) if len(order) else np.zeros(0)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(order) else precision  # envelope
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def score_detections(split, answers: list[dict[str, Any] | None], classes: list[str]) -> dict[str, Any]:
    """Sanity problems, AP50 (mean over classes present) and hit rate of the served detections."""
    malformed: list[str] = []
    per_class: dict[int, list[tuple[float, bool]]] = {}
    truth_count: dict[int, int] = {}
    found = total = 0
    for i, answer in enumerate(answers):
        truth = split.boxes[split.box_image_index == i].astype(np.float64)
        truth_labels = split.box_labels[split.box_image_index == i]
        for label in truth_labels.tolist():
            truth_count[label] = truth_count.get(label, 0) + 1
        total += len(truth)
        if answer is None:
            continue
        dets = answer.get("detections") or [{}]
        height, width = split.x[i].shape[:2]
        problems = sanity_problems(dets[0], width, height, classes, f"image {i}")
        if problems:
            malformed += problems
            continue
        boxes = np.array(dets[0]["boxes"], dtype=np.float64).reshape(-1, 4)
        ids, scores = np.array(dets[0]["label_ids"], dtype=np.int64), np.array(dets[0]["scores"])
        ious = iou_matrix(boxes, truth) if len(truth) else np.zeros((len(boxes), 0))
        taken = np.zeros(len(truth), bool)
        for k in np.argsort(-scores, kind="stable"):  # greedy, best score first, as COCO matches
            same = (truth_labels == ids[k]) & ~taken
            cand = np.where(same, ious[k], -1.0) if len(truth) else np.zeros(0)
            best = int(np.argmax(cand)) if len(cand) else -1
            hit = best >= 0 and cand[best] >= IOU_MATCH
            if hit:
                taken[best] = True
                found += int(scores[k] >= HIT_SCORE)
            per_class.setdefault(int(ids[k]), []).append((float(scores[k]), bool(hit)))
    aps = [average_precision(per_class.get(c, []), n) for c, n in truth_count.items()]
    return {
        "served_map50": round(float(np.mean(aps)) if aps else 0.0, 4),
        "hit_rate": round(found / max(1, total), 4),
        "objects": total,
        "malformed": malformed,
    }
