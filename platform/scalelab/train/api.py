"""``run_training``: one entry point for local and Ray Train runs; writes the model bundle."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.config.specs import RecipeSpec
from scalelab.data.catalog import load_dataset
from scalelab.train.checkpoint import save_model_bundle
from scalelab.train.loop import bundle_meta


@dataclass
class TrainOutcome:
    run_name: str
    model_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    run_id: str | None = None  # the MLflow run, when tracking is enabled


def default_run_name(spec: RecipeSpec) -> str:
    return spec.train.run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(spec: RecipeSpec, run_name: str | None = None, on_epoch=None) -> TrainOutcome:
    """Train per the recipe (in-process when ``train.workers == 0``); resume a run of the same name."""
    from scalelab.train.local import run_local

    name = run_name or default_run_name(spec)
    data = load_dataset(spec.data)
    started = time.perf_counter()
    run_dir = Path(spec.train.storage_path) / name
    result = run_local(spec, data, run_dir, on_epoch=on_epoch)
    wall = time.perf_counter() - started

    out = Path(spec.train.output_dir) / name
    model_dir = save_model_bundle(result.model, out / "model", bundle_meta(spec, data, result.runtime))
    metrics = {
        "test_acc": result.test.accuracy,
        "test_loss": result.test.loss,
        "val_acc": result.val.accuracy,
        "params": result.params,
        "precision": result.runtime.precision,
        "wall_seconds": wall,
        "resumed_from_epoch": result.start_epoch,
        "per_class_test_acc": result.test.per_class_accuracy,
        "confusion": result.test.confusion.tolist(),
    }
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=2))
    return TrainOutcome(name, model_dir, metrics, result.history)
