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


# ----------------------------------------------------------------------------- process memory


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, RssAnon, RssShmem) in MB; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


class RssWatch:
    """This process's resident memory over an epoch: ``warm()`` once the first 5% of the epoch's
    steps ran (the model, optimiser state, torch's lazy kernels and the loader's buffers are
    resident by then) starts a fresh peak; ``metrics()`` gives that peak (``peak_rss_mb``) and how
    far it rose above the warm level (``rss_growth_mb``): what the rest of the epoch added at most
    (a loader that kept what it read would add the dataset). Linux only (the peak is reset through
    ``/proc/self/clear_refs``); elsewhere it reports nothing."""

    def __init__(self) -> None:
        self.level: float | None = None

    def warm(self) -> None:
        self.level = _status_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            self.level = None

    def metrics(self) -> dict[str, float]:
        peak = _status_mb("VmHWM")
        if self.level is None or peak is None:
            return {}
        out = {"peak_rss_mb": peak, "rss_growth_mb": max(0.0, peak - self.level)}
        # what is resident at the epoch's end, split: private memory vs shared pages (Ray's object
        # store maps blocks into readers zero-copy, and those pages count in VmRSS too)
        for field, key in (("RssAnon", "rss_anon_mb"), ("RssShmem", "rss_shmem_mb")):
            value = _status_mb(field)
            if value is not None:
                out[key] = value
        return out
