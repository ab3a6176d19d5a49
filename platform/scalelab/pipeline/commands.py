"""``scalelab pipeline run RECIPE [--from STEP] [--to STEP]``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from scalelab.config.project import absolute, in_project, shown
from scalelab.serve.smoke import smoke_summary

console = Console()


def run_pipeline(
    recipe: str | Path,
    overrides: list[str] | None = None,
    start: str | None = None,
    stop: str | None = None,
    log: Callable[[str], None] = console.print,
) -> dict[str, Any]:
    """Run the pipeline's steps (``start``..``stop``) in the recipe's project; every step's outputs."""
    from scalelab.config import load_recipe
    from scalelab.pipeline.runner import PipelineState, run_steps
    from scalelab.pipeline.steps import STEP_NAMES, build_steps, ensure_lasting_ray

    overrides = overrides or []
    with in_project(absolute(recipe)):
        spec = load_recipe(absolute(recipe), overrides)
        needs_ray = start not in ("report",) and STEP_NAMES.index(stop or "report") >= STEP_NAMES.index(
            "tune"
        )
        if needs_ray:
            ensure_lasting_ray()
        state = PipelineState(Path(".scalelab/pipeline") / spec.name / "state.json")
        rerun = " ".join(["scalelab pipeline run", str(recipe), *overrides])
        return run_steps(build_steps(spec, absolute(recipe), overrides), state, rerun, start, stop, log=log)


def print_log_locations() -> None:
    """Where the quiet console's details went: Ray's and Serve's logs, the stack's own logs."""
    from scalelab.cluster.session import STATE_DIR, read_stack

    ray_logs = read_stack().get("ray_logs")
    where = f"Ray {ray_logs} (Serve's request logs in serve/), " if ray_logs else ""
    console.print(f"logs: {where}stack processes {STATE_DIR / 'stack'}/", highlight=False, soft_wrap=True)


def print_run_locations(out: dict) -> None:
    """The training run (and the search's parent run): ids, store, and how to look at them."""
    from scalelab.tracking.ui import run_location

    train = out.get("train") or {}
    uri = train.get("tracking_uri")
    if not (uri and train.get("run_id")):
        return
    parent = (out.get("tune") or {}).get("parent_run_id")
    if parent:
        console.print(f"search: MLflow parent run {parent}", highlight=False)
    for line in run_location(uri, train["run_id"]):
        console.print(line.replace("MLflow run", "training: MLflow run"), highlight=False, soft_wrap=True)


def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. pipelines/digits.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. search.num_samples=4.")
    ] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Rerun from this step (earlier steps reuse outputs).")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Stop after this step.")] = None,
) -> dict[str, Any]:
    """data -> tune -> train -> register -> promote -> serve -> smoke -> report; finished steps skip."""
    began = time.perf_counter()
    out = run_pipeline(recipe, overrides or [], start, stop)
    console.print(f"[bold green]pipeline done[/] in {time.perf_counter() - began:.0f}s", highlight=False)
    print_run_locations(out)
    if str((out.get("data") or {}).get("push", "")).startswith("not pushed"):
        data = out["data"]
        console.print(f"data {shown(data['path'])}: {data['push']}", highlight=False, soft_wrap=True)
    if "smoke" in out:
        console.print(smoke_summary(out["smoke"]), highlight=False)
    if "report" in out:
        console.print(
            f"report: {shown(out['report']['html'])} (and {shown(out['report']['markdown'])})",
            highlight=False,
        )
    if "serve" in out:
        console.print("the service keeps running on the local Ray head; `scalelab down` stops it")
    with in_project(absolute(recipe)):  # the project's stack file
        print_log_locations()
    return out
