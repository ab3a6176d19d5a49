"""Device, precision and seeding of a training run: detected (``artifacts.hardware``), never assumed."""

from __future__ import annotations

import os
import random
import threading
import time
import weakref

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


def _status_fields(*fields: str) -> dict[str, float]:
    """``/proc/self/status`` memory fields (VmRSS, VmHWM, RssAnon, RssShmem) in MB, read in one pass;
    empty without /proc."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    out[name] = int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return {}
    return out


def _status_mb(field: str) -> float | None:
    """One ``/proc/self/status`` memory field in MB; None without /proc."""
    return _status_fields(field).get(field)


class RssWatch:
    """This process's resident memory over an epoch: ``warm()`` once the first 5% of the epoch's
    steps ran (the model, optimiser state, torch's lazy kernels and the loader's buffers are
    resident by then) starts a fresh peak; ``metrics()`` ends the watch and gives:

    - ``peak_rss_mb`` / ``rss_growth_mb``: the resident set's peak (the kernel's VmHWM, reset at
      warm-up through ``/proc/self/clear_refs``) and how far it rose above the warm level. It counts
      shared pages too: Ray's object store maps blocks into their readers zero-copy.
    - ``peak_rss_anon_mb`` / ``rss_anon_growth_mb`` (``rss_anon_warm_mb``): private memory
      (``RssAnon``) at its peak and how far it rose above the warm level: what the rest of the
      epoch added to this process (a loader that kept what it read would add the dataset). The
      kernel keeps no peak of it, so a thread samples it every ``interval_s`` (and at the end).
    - ``peak_rss_shmem_mb``: shared pages (``RssShmem``) at their sampled peak.
    - ``rss_anon_mb`` / ``rss_shmem_mb``: both at the epoch's end.

    Linux only; elsewhere it reports nothing."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.level: float | None = None
        self.interval_s = interval_s
        self.anon_warm: float | None = None
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()

    def warm(self) -> None:
        self.level = _status_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            self.level = None
            return
        self.anon_warm = _status_mb("RssAnon")
        self._sample()
        # the thread holds the watch weakly: an epoch that raises leaves no sampler behind
        threading.Thread(target=_sample_until_stopped, args=(weakref.ref(self),), daemon=True).start()

    def _sample(self) -> None:
        for field, value in _status_fields("RssAnon", "RssShmem").items():  # one read per sample
            if value > self.peaks.get(field, -1.0):
                self.peaks[field] = value

    def metrics(self) -> dict[str, float]:
        self._stop.set()
        peak = _status_mb("VmHWM")
        if self.level is None or peak is None:
            return {}
        self._sample()
        out = {"peak_rss_mb": peak, "rss_growth_mb": max(0.0, peak - self.level)}
        if "RssAnon" in self.peaks and self.anon_warm is not None:
            out.update(
                peak_rss_anon_mb=self.peaks["RssAnon"],
                rss_anon_warm_mb=self.anon_warm,
                rss_anon_growth_mb=max(0.0, self.peaks["RssAnon"] - self.anon_warm),
            )
        if "RssShmem" in self.peaks:
            out["peak_rss_shmem_mb"] = self.peaks["RssShmem"]
        end = _status_fields("RssAnon", "RssShmem")
        for field, key in (("RssAnon", "rss_anon_mb"), ("RssShmem", "rss_shmem_mb")):
            if field in end:
                out[key] = end[field]
        return out


def _sample_until_stopped(ref: weakref.ref) -> None:
    while (watch := ref()) is not None and not watch._stop.is_set():
        watch._sample()
        interval = watch.interval_s
        del watch
        time.sleep(interval)
