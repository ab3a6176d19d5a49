"""``scalelab train``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from scalelab.train.api import TrainOutcome

console = Console()


def print_epoch(metrics: dict) -> None:
    console.print(
        f"epoch {metrics['epoch']:>3}  loss {metrics['train_loss']:.4f}  val_acc {metrics['val_acc']:.4f}  "
        f"lr {metrics['lr']:.4g}  {metrics['images_per_s']:,.0f} img/s  {metrics['epoch_seconds']:.2f}s",
        highlight=False,
    )


def print_run_location(outcome) -> None:
    """The MLflow run id, where it is, and the command that shows it (nothing when untracked)."""
    from scalelab.tracking.ui import run_location

    if outcome.run_id and outcome.tracking_uri:
        for line in run_location(outcome.tracking_uri, outcome.run_id, outcome.experiment_id):
            console.print(line, highlight=False, soft_wrap=True)


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. pipelines/digits.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides: train.epochs=3 model.scales=4.")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Run name to resume from its last checkpoint.")
    ] = None,
    *,
    quiet: bool = False,
) -> TrainOutcome:
    """Train a model from a recipe (in-process, or on Ray Train when train.workers > 0)."""
    # Runs in the recipe's project (scalelab.config.project); the outcome's paths are absolute.
    # ``quiet`` (the pipeline): only the progress within epochs, no header, epoch or summary lines.
    from scalelab.config import load_recipe
    from scalelab.config.project import absolute, in_project, shown
    from scalelab.train.api import run_training

    with in_project(absolute(recipe)) as root:
        spec = load_recipe(absolute(recipe), overrides or [])
        if not quiet:
            console.print(
                f"[bold]train[/] {spec.name}: model {spec.model.variant or 'custom'} "
                f"scales={spec.model.scales} depths={spec.model.depths} widths={spec.model.widths}, "
                f"{spec.train.epochs} epochs, workers={spec.train.workers}",
                highlight=False,
            )
        outcome = run_training(spec, run_name=resume, on_epoch=None if quiet else print_epoch, progress=True)
    outcome.model_dir = root / outcome.model_dir  # unchanged when already absolute
    if quiet:
        return outcome
    m = outcome.metrics
    if m.get("worker_node_ids"):
        nodes = m["worker_node_ids"]
        console.print(
            f"workers ran on {len(set(nodes))} node(s): {' '.join(n[:12] for n in nodes)}",
            highlight=False,
        )
    console.print(
        f"[bold green]done[/] run {outcome.run_name}: test_acc {m['test_acc']:.4f} "
        f"({m['params']:,} params, {m['precision']}, {m['wall_seconds']:.1f}s) -> "
        f"{shown(outcome.model_dir)}",
        highlight=False,
    )
    print_run_location(outcome)
    return outcome
