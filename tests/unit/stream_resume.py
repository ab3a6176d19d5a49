"""Shared by the streamed classification and detection resume tests: crash a streamed ``fit`` right
after the mid-epoch checkpoint at ``step`` of the second epoch, resume from that checkpoint, and
return what each run logged (``SCALELAB_SAMPLE_LOG``: one JSON line per batch with its ids)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


class Crash(Exception):
    pass


def crash_and_resume(spec, ds, tmp_path: Path, monkeypatch, step: int):
    """(result of the resumed fit, epoch-2 batch rows before the crash, epoch-2 rows after it)."""
    from scalelab.train.loop import fit

    saved = tmp_path / "ckpt"

    def crash_after_checkpoint(metrics, ckpt):
        if metrics.get("mid_epoch") and metrics["epoch"] == 1 and metrics["step"] == step:
            shutil.copytree(ckpt, saved)
            raise Crash

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(first))
    with pytest.raises(Crash):
        fit(spec, ds, report=crash_after_checkpoint)
    monkeypatch.setenv("SCALELAB_SAMPLE_LOG", str(second))
    result = fit(spec, ds, report=lambda m, c: None, resume_from=saved)

    def rows(path: Path) -> list[dict]:
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["epoch"] == 1]

    return result, rows(first), rows(second)
