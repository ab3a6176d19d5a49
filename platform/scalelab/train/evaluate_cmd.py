"""``scalelab evaluate MODEL_DIR RECIPE``: score a model bundle (classifier or detector) on a split of the
prepared data, with ``artifacts.evaluate`` (the evaluation training, search and the gate use)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from scalelab.artifacts.evaluate import evaluate_predictor
from scalelab.artifacts.predictor import Predictor
from scalelab.config import load_recipe
from scalelab.data.catalog import load_dataset
from scalelab.errors import DataError
from scalelab.train.runtime import select_runtime, set_threads

console = Console()


def evaluate_bundle(
    model_dir: str | Path,
    recipe: str,
    overrides: list[str] | None = None,
    split: str = "test",
    test_time_flip: bool | None = None,
) -> dict[str, Any]:
    """Metrics of the bundle on ``split`` of the recipe's dataset (version-checked against DVC).

    Classifiers: accuracy, loss, per-class accuracy, confusion; detectors: ``*_acc`` is mAP@0.5,
    beside ``*_map``, ``*_map50``, ... and per-class AP@0.5. ``test_time_flip`` turns a
    classifier's mirror-averaging on or off for this evaluation only (None: as the bundle was
    trained), e.g. to measure what it adds.
    """
    spec = load_recipe(recipe, overrides or [])
    set_threads(spec.train.threads)
    predictor = Predictor.from_bundle(model_dir)
    data = load_dataset(spec.data, prepare_if_missing=False)
    meta = predictor.meta
    trained_on = meta.get("dataset", {})
    if trained_on.get("classes") and trained_on["classes"] != data.classes:
        raise DataError(
            f"{model_dir} was trained on classes {trained_on['classes']}, but {spec.data.name} has "
            f"{data.classes}; evaluate it on the dataset it was trained for"
        )
    model = predictor.model
    if test_time_flip is not None:
        if test_time_flip and not data.hflip_ok:
            raise DataError(f"{spec.data.name} images are not left-right symmetric: no test-time flip")
        if predictor.task != "classification":
            raise DataError(f"{model_dir} is not a classifier: test-time flip applies to classifiers only")
        model.spec = model.spec.model_copy(update={"test_time_flip": test_time_flip})
    if split not in data.splits:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(data.splits)}")
    runtime = select_runtime(spec.train)
    # the model's own normalisation (from its bundle), so a re-prepared dataset cannot skew it
    result = evaluate_predictor(predictor, data.splits[split], runtime=runtime)
    trained_version = (meta.get("data_version") or {}).get("content_hash")
    return {
        **result.as_metrics(split),  # detection: {split}_map50, {split}_map, {split}_map_small, ...
        f"{split}_acc": result.accuracy,
        f"{split}_loss": result.loss,
        "per_class_acc": dict(zip(data.classes, result.per_class_accuracy, strict=True)),
        "confusion": result.confusion.tolist(),
        "images": len(data.splits[split]),
        "precision": runtime.precision,
        "data_version": data.version.to_dict() if data.version else None,
        "same_data_as_training": trained_version == (data.version.content_hash if data.version else None),
        "weights_sha256": meta.get("weights_sha256"),
        "test_time_flip": bool(getattr(getattr(model, "spec", None), "test_time_flip", False)),
    }


def evaluate_command(
    model_dir: Annotated[Path, typer.Argument(help="Model bundle folder (model.safetensors + model.json).")],
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML whose prepared dataset to evaluate on.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.threads=1.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the metrics as JSON here (a DVC metrics file).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: train, val or test.")] = "test",
    test_time_flip: Annotated[
        bool | None,
        typer.Option(
            "--test-time-flip/--no-test-time-flip",
            help="Average each image with its mirror (or not) for this evaluation; default: as trained.",
        ),
    ] = None,
) -> dict[str, Any]:
    """Evaluate a trained model bundle on the recipe's prepared data."""
    from scalelab.config.project import absolute, in_project

    with in_project(absolute(recipe)):  # the recipe's data_dir is relative to its project
        metrics = evaluate_bundle(absolute(model_dir), absolute(recipe), overrides, split, test_time_flip)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
    note = "" if metrics["same_data_as_training"] else " (data version differs from training's)"
    console.print(
        f"{split}_acc {metrics[f'{split}_acc']:.4f}  {split}_loss {metrics[f'{split}_loss']:.4f}  "
        f"on {metrics['images']} images{note}{' -> ' + str(out) if out else ''}",
        highlight=False,
    )
    return metrics
