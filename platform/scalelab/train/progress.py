"""Progress inside an epoch: a rich bar on a terminal, a plain line every few seconds elsewhere.

Long epochs (Fashion-MNIST: ~2 minutes on 2 CPU cores) otherwise show nothing until they end.
Only rank 0 reports (:func:`progress_for` gives the other ranks nothing), and the counts are
plain Python ints: nothing here synchronises the device.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Protocol

PLAIN_INTERVAL_ENV = "SCALELAB_PROGRESS_INTERVAL_S"  # seconds between plain lines (default 10)


class EpochProgress(Protocol):
    def start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def advance(self, images: int) -> None: ...

    def finish(self) -> None: ...


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


class PlainProgress:
    """``epoch 3/40  step 120/390 (31%)  1,234 img/s  ETA 0:22`` every ``interval_s`` (CI, job logs).

    Nothing is printed for an epoch shorter than the interval: its per-epoch line says it all.
    """

    def __init__(self, stream: IO[str] | None = None, interval_s: float | None = None) -> None:
        self.stream = stream or sys.stdout
        self.interval_s = (
            float(os.environ.get(PLAIN_INTERVAL_ENV, "10")) if interval_s is None else interval_s
        )
        self.epoch = self.epochs = self.steps = self.done = self.images = 0
        self.began = self.last = 0.0

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, max(1, steps)
        self.done = self.images = 0
        self.began = self.last = time.perf_counter()

    def advance(self, images: int) -> None:
        self.done += 1
        self.images += images
        now = time.perf_counter()
        if now - self.last >= self.interval_s and self.done < self.steps:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.perf_counter()) - self.began)
        eta = (self.steps - self.done) * elapsed / max(1, self.done)
        return (
            f"epoch {self.epoch}/{self.epochs}  step {self.done}/{self.steps} "
            f"({100 * self.done // self.steps}%)  {self.images / elapsed:,.0f} img/s  ETA {format_eta(eta)}"
        )

    def finish(self) -> None:
        pass


class RichProgress:
    """A transient bar per epoch (steps, images/s, ETA); the per-epoch line replaces it."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = None
        self.began = 0.0
        self.images = 0

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        self.began, self.images = time.perf_counter(), 0
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", rate="-")

    def advance(self, images: int) -> None:
        self.images += images
        rate = self.images / max(1e-9, time.perf_counter() - self.began)
        self.progress.update(self.task, advance=1, rate=f"{rate:,.0f}")

    def finish(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.stop()


def progress_for(rank: int, stream: IO[str] | None = None) -> EpochProgress | None:
    """Rank 0's progress reporter for ``stream`` (stdout): a bar on a terminal, plain lines elsewhere."""
    if rank != 0:
        return None
    stream = stream or sys.stdout
    if stream is sys.stdout and stream.isatty():
        return RichProgress()
    return PlainProgress(stream)


class FirstStepSignal:
    """Wraps a run's progress reporter (or none) and records when the run's first training step is
    done, as ``timing["first_step"]`` (what ``benchmarks/train.py`` reports as the first step)."""

    def __init__(self, inner: EpochProgress | None, timing: dict) -> None:
        self.inner = inner
        self.timing = timing

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.inner is not None:
            self.inner.start(epoch, epochs, steps)

    def advance(self, images: int) -> None:
        self.timing.setdefault("first_step", time.time())
        if self.inner is not None:
            self.inner.advance(images)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()
