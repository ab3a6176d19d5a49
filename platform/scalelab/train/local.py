"""Local mode: the training loop in this process, checkpoints in a folder, resumable by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from scalelab.config.specs import RecipeSpec
from scalelab.data.dataset import Dataset
from scalelab.train.loop import FitResult, fit

# checkpoint_EEEE (after epoch E) or checkpoint_EEEE_SSSSSS (mid-epoch: step S of the next epoch);
# names sort in training order
CKPT_RE = re.compile(r"checkpoint_(\d{4,})(_\d{6,})?$")


def checkpoint_name(metrics: dict[str, Any]) -> str:
    epoch = int(metrics["epoch"])
    return (
        f"checkpoint_{epoch:04d}_{int(metrics['step']):06d}"
        if metrics.get("mid_epoch")
        else f"checkpoint_{epoch:04d}"
    )


class CheckpointKeeper:
    """Keeps the ``num_to_keep`` best checkpoints by val_acc, and always the latest (for resume)."""

    def __init__(self, run_dir: Path, num_to_keep: int) -> None:
        self.run_dir = run_dir
        self.num_to_keep = num_to_keep
        run_dir.mkdir(parents=True, exist_ok=True)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name))

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, src: str, epoch: int, metrics: dict[str, Any]) -> Path:
        dest = self.run_dir / checkpoint_name({**metrics, "epoch": epoch})
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, default=float))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # a crash mid-copy leaves only a .partial folder, never a torn checkpoint
        self._prune()
        return dest

    def _prune(self) -> None:
        ckpts = self.checkpoints()
        latest = ckpts[-1]

        def score(p: Path) -> float:
            try:
                return float(json.loads((p / "metrics.json").read_text()).get("val_acc", 0.0))
            except (OSError, ValueError):
                return 0.0

        keep = set(sorted(ckpts, key=score, reverse=True)[: self.num_to_keep]) | {latest}
        for p in ckpts:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def run_local(
    spec: RecipeSpec, data: Dataset, run_dir: Path, on_epoch=None, resume: bool = True, progress=None
) -> FitResult:
    keeper = CheckpointKeeper(run_dir, spec.train.num_to_keep)
    start = keeper.latest() if resume else None

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        if ckpt_dir is not None:
            keeper.save(ckpt_dir, int(metrics["epoch"]), metrics)
        if on_epoch is not None and not metrics.get("mid_epoch"):
            on_epoch(metrics)

    return fit(spec, data, report=report, resume_from=start, progress=progress)
