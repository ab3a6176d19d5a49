"""A loaded model bundle that predicts class probabilities from uint8 images.

Shared by the serving replicas, the bare-FastAPI benchmark baseline and the promotion gate, so
the latency the gate measures and the predictions it checks are those of the serving path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalelab.serve.preprocess import InputSpec, normalise


@dataclass
class Predictor:
    model: torch.nn.Module
    meta: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # registry lineage: name, version, run id...

    def __post_init__(self) -> None:
        self.model.eval()
        self.input = InputSpec.from_meta(self.meta)

    @classmethod
    def from_bundle(cls, path: str | Path, info: dict[str, Any] | None = None) -> Predictor:
        """Safetensors weights + JSON spec, checksum verified; nothing is unpickled."""
        from scalelab.train.checkpoint import load_model_bundle

        model, meta = load_model_bundle(path, verify_checksum=True)
        return cls(model, meta, dict(info or {}))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.input.classes

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, C) -> probabilities (B, K) float32."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        logits = self.model(normalise(images, self.input))
        return torch.softmax(logits.float(), dim=1).numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [{"class": self.classes[j], "index": int(j), "probability": round(float(p[j]), 6)} for j in row]
            for p, row in zip(probs, order, strict=True)
        ]
