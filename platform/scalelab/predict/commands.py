"""``scalelab predict MODEL SOURCE --out preds.parquet``: batch inference on Ray Data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from scalelab.config.project import absolute, in_project, shown
from scalelab.errors import ConfigError
from scalelab.predict.batch import BAD_FILES_SHOWN, PredictSummary, predict
from scalelab.predict.sources import resolve_source

console = Console()


def _as_path_if_local(text: str) -> str:
    """A path that exists here, made absolute (the command runs in the project's folder)."""
    return str(absolute(text)) if not text.startswith("s3://") and Path(text).exists() else text


def predict_command(
    model: Annotated[
        str,
        typer.Argument(
            help="NAME (its @champion), NAME@alias, NAME:version, or a local model bundle folder."
        ),
    ],
    source: Annotated[
        str,
        typer.Argument(
            help="An image folder (root/<class>/*.png labels them; flat: no labels), s3://bucket/prefix, "
            "or a dataset version: a recipe (pipelines/NAME.yaml or NAME) or a prepared folder (data/NAME)."
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", help="Parquet file to write (a local path or s3://bucket/key).")
    ] = "predictions.parquet",
    split: Annotated[str, typer.Option("--split", help="Split of a dataset source.")] = "test",
    data_rev: Annotated[
        str | None,
        typer.Option("--data-rev", help="Dataset source: the version DVC recorded at this git rev."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes and scores kept per image.")] = 5,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per batch (default 256 CPU, 1024 GPU).")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas", min=1, help="Model replicas (actors); default: one per GPU, else CPUs/threads."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="Torch threads (and CPUs) per replica (default <= 4)."),
    ] = None,
    on_bad_file: Annotated[
        str,
        typer.Option(
            "--on-bad-file", help="skip: count and report unreadable images; fail: stop at the first."
        ),
    ] = "skip",
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels", min=64, help="Largest image accepted (pixels), as the server limits it."
        ),
    ] = 16_000_000,
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// (default: resolved)."),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow URI (default: resolved).")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray address (default: the `scalelab up` stack or local).")
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option("--summary", help="Also write the summary (with every bad file) as JSON here."),
    ] = None,
    *,
    quiet: bool = False,
) -> PredictSummary:
    """Score an image folder, an S3 prefix or a dataset version with a model on Ray Data, into Parquet."""
    if on_bad_file not in ("skip", "fail"):
        raise ConfigError(f"--on-bad-file {on_bad_file!r}: use skip (count and report) or fail (stop)")
    source = _as_path_if_local(source)
    model = str(absolute(model)) if (Path(model) / "model.json").is_file() else model
    out = out if out.startswith("s3://") else str(absolute(out))
    recipe = source if source.endswith((".yaml", ".yml")) else None
    with in_project(recipe):
        resolved = resolve_source(source, split, data_rev, endpoint_url)
        if not quiet:
            console.print(
                f"predicting {len(resolved):,} images of {resolved.where} with {model}", highlight=False
            )
        result = predict(
            model,
            resolved,
            out,
            tracking_uri=tracking_uri,
            address=address,
            replicas=replicas,
            threads=threads,
            batch_size=batch_size,
            top_k=top_k,
            on_bad_file=on_bad_file,
            max_pixels=max_pixels,
            progress=not quiet,
        )
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not quiet:
        _print_summary(result)
    return result


def _print_summary(s: PredictSummary) -> None:
    version = f" v{s.model_version}" if s.model_version else " (local bundle)"
    where = s.out if s.out.startswith("s3://") else shown(s.out)
    acc = f"; accuracy {s.accuracy:.4f} on {s.labelled:,} labelled images" if s.accuracy is not None else ""
    console.print(
        f"[bold green]predicted[/] {s.images:,} images with {s.model}{version} in {s.seconds:.1f} s "
        f"({s.images_per_s:,.0f} images/s, {s.plan['replicas']} replicas x {s.plan['threads']} threads"
        f"{' + 1 GPU each' if s.plan['gpus_per_replica'] else ''}){acc} -> {where}",
        highlight=False,
    )
    if s.bad:
        console.print(f"[yellow]skipped {s.bad} unreadable image(s):[/]", highlight=False)
        for bad in s.bad_files[:BAD_FILES_SHOWN]:
            console.print(f"  {bad['error']}", highlight=False, markup=False)
        if s.bad > BAD_FILES_SHOWN:
            console.print(f"  ... and {s.bad - BAD_FILES_SHOWN} more (--summary FILE lists them all)")
