"""Device, precision and seeding: detected, never assumed."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from scalelab.config.specs import TrainSpec


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def select_runtime(spec: TrainSpec, device: torch.device | None = None) -> Runtime:
    """Pick device, autocast dtype and memory format from the spec and the hardware."""
    if device is None:
        device = torch.device("cuda") if spec.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if spec.use_gpu and device.type != "cuda":
        raise RuntimeError("train.use_gpu is true but no CUDA device is visible; set train.use_gpu=false")
    if spec.precision == "fp32":
        dtype = None
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() or spec.precision == "bf16" else None
    else:
        dtype = torch.bfloat16 if spec.precision == "bf16" or cpu_has_fast_bf16() else None
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
