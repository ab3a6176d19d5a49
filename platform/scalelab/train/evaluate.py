"""Evaluation: accuracy, per-class accuracy, confusion matrix (summed over workers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalelab.train.runtime import Runtime


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # (K, K): rows true class, columns predicted

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.accuracy}


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, runtime: Runtime) -> EvalResult:
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for x, y in loader:
        with runtime.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        pred = logits.argmax(1)
        conf += (
            torch.bincount(y * num_classes + pred, minlength=num_classes**2)
            .view(num_classes, num_classes)
            .double()
        )
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
    )
