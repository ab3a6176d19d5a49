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
    if "smoke" in out:
        console.print(smoke_summary(out["smoke"]), highlight=False)
    if "report" in out:
        console.print(
            f"report: {shown(out['report']['html'])} (and {shown(out['report']['markdown'])})",
            highlight=False,
        )
    if "serve" in out:
        console.print("the service keeps running on the local Ray head; `scalelab down` stops it")
    return out
