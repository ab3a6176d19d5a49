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

    device: str = "cpu"

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        self.input = InputSpec.from_meta(self.meta)
        # Predict in the precision the model was trained and evaluated in (bf16 autocast where the
        # hardware has it), so served predictions reproduce the recorded test accuracy.
        self.dtype = inference_dtype(self.meta.get("precision"), self.device)
        if self.dtype is not None:
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_bundle(cls, path: str | Path, info: dict[str, Any] | None = None) -> Predictor:
        """Safetensors weights + JSON spec, checksum verified; nothing is unpickled."""
        from scalelab.train.checkpoint import load_model_bundle

        model, meta = load_model_bundle(path, verify_checksum=True)
        # a replica given a GPU (serve.gpus_per_replica) sees it as CUDA_VISIBLE_DEVICES
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, meta, dict(info or {}), device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.input.classes

    @property
    def task(self) -> str:
        return "detection" if self.input.keep_size else "classification"

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """uint8 (H, W, C) images of any size -> boxes (x1, y1, x2, y2 in each image's pixels)."""
        from scalelab.models.detection import predict_boxes

        out = predict_boxes(self.model, images, self.meta)
        return [
            {
                "boxes": [[round(float(v), 2) for v in b] for b in d["boxes"]],
                "labels": d["labels"],
                "label_ids": [int(i) for i in d["label_ids"]],
                "scores": [round(float(v), 6) for v in d["scores"]],
            }
            for d in out
        ]

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, C) -> probabilities (B, K) float32."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        x = normalise(images, self.input).to(self.device, non_blocking=True)  # (B, C, H, W)
        if self.dtype is None:
            logits = self.model(x)
        else:
            with torch.autocast(x.device.type, dtype=self.dtype):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [{"class": self.classes[j], "index": int(j), "probability": round(float(p[j]), 6)} for j in row]
            for p, row in zip(probs, order, strict=True)
        ]


def inference_dtype(precision: str | None, device: str) -> torch.dtype | None:
    """bf16 when the model was trained in bf16 and this device runs bf16 natively; else fp32 (None)."""
    if precision != "bf16":
        return None
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    from scalelab.train.runtime import cpu_has_fast_bf16

    return torch.bfloat16 if cpu_has_fast_bf16() else None
