"""Device, precision and seeding of a training run: detected (``artifacts.hardware``), never assumed."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from scalelab.artifacts.hardware import Runtime, training_dtype
from scalelab.config.specs import TrainSpec


def select_runtime(spec: TrainSpec, device: torch.device | None = None) -> Runtime:
    """Pick device, autocast dtype and memory format from the spec and the hardware."""
    if device is None:
        device = torch.device("cuda") if spec.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if spec.use_gpu and device.type != "cuda":
        raise RuntimeError("train.use_gpu is true but no CUDA device is visible; set train.use_gpu=false")
    dtype = training_dtype(spec.precision, device)
    channels_last = spec.channels_last if spec.channels_last is not None else dtype is not None
    return Runtime(device=device, dtype=dtype, channels_last=channels_last)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
