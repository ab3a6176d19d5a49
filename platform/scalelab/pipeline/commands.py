"""``scalelab pipeline run RECIPE [--from STEP] [--to STEP]``."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def ensure_lasting_ray() -> None:
    """Connect through the Ray session (tests, jobs, `scalelab up`); with no head to connect to,
    first start one of our own (by pid, in .scalelab/stack.json) so the served model outlives
    this command."""
    import os

    import ray

    from scalelab.cluster.session import connect_ray, live_ray_address
    from scalelab.cluster.stack import up

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and live_ray_address() is None:
        console.print("starting a local Ray head for the pipeline (stop it with `scalelab down`)")
        up(mlflow=False, s3=False, ray=True)
    connect_ray()  # the head's address and its token auth mode come from stack.json


def run_pipeline(
    recipe: str, overrides: list[str], start: str | None, stop: str | None, log=console.print
) -> dict:
    from scalelab.config import load_recipe
    from scalelab.pipeline.runner import PipelineState, run_steps
    from scalelab.pipeline.steps import STEP_NAMES, build_steps

    spec = load_recipe(recipe, overrides)
    needs_ray = start not in ("report",) and STEP_NAMES.index(stop or "report") >= STEP_NAMES.index("tune")
    if needs_ray:
        ensure_lasting_ray()
    state = PipelineState(Path(".scalelab/pipeline") / spec.name / "state.json")
    rerun = " ".join(["scalelab pipeline run", recipe, *overrides])
    return run_steps(build_steps(spec, Path(recipe), overrides), state, rerun, start, stop, log=log)


def register(app: typer.Typer) -> None:
    pipeline_app = typer.Typer(help="The whole path of one model, step by step.", no_args_is_help=True)
    app.add_typer(pipeline_app, name="pipeline")

    @pipeline_app.command("run")
    def run_cmd(
        recipe: str = typer.Argument(..., help="Recipe YAML, e.g. pipelines/digits.yaml."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. search.num_samples=4."),
        start: str = typer.Option(None, "--from", help="Rerun from this step (earlier steps reuse outputs)."),
        stop: str = typer.Option(None, "--to", help="Stop after this step."),
    ) -> None:
        """data -> tune -> train -> register -> promote -> serve -> smoke -> report; finished steps skip."""
        began = time.perf_counter()
        out = run_pipeline(recipe, overrides or [], start, stop)
        console.print(f"[bold green]pipeline done[/] in {time.perf_counter() - began:.0f}s", highlight=False)
        if "smoke" in out:
            s = out["smoke"]
            console.print(
                f"served at {s['url']}/ (demo page) and {s['url']}/v1/predict: test accuracy over "
                f"HTTP {s['served_test_acc']:.4f} on {s['images']} held-out images "
                f"(offline {s['offline_test_acc']:.4f}), p50 {s['latency_p50_ms']} ms",
                highlight=False,
            )
        if "report" in out:
            console.print(
                f"report: {out['report']['html']} (and {out['report']['markdown']})", highlight=False
            )
        if "serve" in out:
            console.print("the service keeps running on the local Ray head; `scalelab down` stops it")
