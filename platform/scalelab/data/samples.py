"""A few held-out test images with their true labels, kept in the model bundle (``samples.json``)
so the demo page offers one-click examples without reaching the dataset."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.dataset import Split

SAMPLES_FILE = "samples.json"


def png_base64(image: np.ndarray) -> str:
    """(H, W, C) uint8 -> base64 PNG (grey for one channel)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pick_samples(
    split: Split, classes: list[str], per_class: int = 2, limit: int = 20
) -> list[dict[str, Any]]:
    """The first ``per_class`` images of each class (deterministic), at most ``limit`` in all."""
    chosen: list[int] = []
    for c in range(len(classes)):
        chosen += [int(i) for i in np.flatnonzero(split.y == c)[:per_class]]
    chosen = sorted(chosen)[:limit] if len(chosen) > limit else chosen
    return [{"png": png_base64(split.x[i]), "label": classes[int(split.y[i])], "index": i} for i in chosen]


def write_samples(split: Split, classes: list[str], bundle_dir: str | Path) -> Path:
    path = Path(bundle_dir) / SAMPLES_FILE
    path.write_text(json.dumps({"split": "test", "samples": pick_samples(split, classes)}))
    return path


def read_samples(bundle_dir: str | Path) -> list[dict[str, Any]]:
    """The bundle's samples ([] for bundles without them: detection, or older bundles)."""
    path = Path(bundle_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("samples", []))
    except (ValueError, AttributeError):
        return []
