"""What the hardware runs well: CPU features, the autocast dtype, detected and never assumed.

Training picks its precision here (``train/runtime.py``) and inference (``Predictor``, evaluation)
picks the precision a bundle was trained in here, so both sides agree on one machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch


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
    """Where and how a model runs: device, autocast dtype, memory format."""

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


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a recipe's ``train.precision`` ('auto', 'fp32', 'bf16') on ``device``.

    'auto' means bf16 where the device runs it natively (CUDA with bf16, a CPU with AMX-BF16 or
    AVX512-BF16), fp32 (None) elsewhere; 'bf16' forces it.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() or precision == "bf16" else None
    return torch.bfloat16 if precision == "bf16" or cpu_has_fast_bf16() else None


def inference_dtype(precision: str | None, device: str | torch.device) -> torch.dtype | None:
    """bf16 when the model was trained in bf16 and this device runs bf16 natively; else fp32 (None)."""
    if precision != "bf16":
        return None
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def inference_runtime(precision: str | None, device: str | torch.device) -> Runtime:
    """The runtime a bundle trained in ``precision`` runs in here (channels_last with bf16)."""
    dtype = inference_dtype(precision, device)
    return Runtime(device=torch.device(device), dtype=dtype, channels_last=dtype is not None)
