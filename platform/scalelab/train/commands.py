"""``scalelab train``."""

from __future__ import annotations

import typer
from rich.console import Console

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


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        recipe: str = typer.Argument(..., help="Recipe YAML, e.g. pipelines/digits.yaml."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides: train.epochs=3 model.scales=4."),
        resume: str = typer.Option(None, "--resume", help="Run name to resume from its last checkpoint."),
    ) -> None:
        """Train a model from a recipe (in-process, or on Ray Train when train.workers > 0)."""
        from scalelab.config import load_recipe
        from scalelab.train.api import run_training

        spec = load_recipe(recipe, overrides or [])
        console.print(
            f"[bold]train[/] {spec.name}: model {spec.model.variant or 'custom'} scales={spec.model.scales} "
            f"depths={spec.model.depths} widths={spec.model.widths}, {spec.train.epochs} epochs, "
            f"workers={spec.train.workers}",
            highlight=False,
        )
        outcome = run_training(spec, run_name=resume, on_epoch=print_epoch, progress=True)
        m = outcome.metrics
        if m.get("worker_node_ids"):
            nodes = m["worker_node_ids"]
            console.print(
                f"workers ran on {len(set(nodes))} node(s): {' '.join(n[:12] for n in nodes)}",
                highlight=False,
            )
        console.print(
            f"[bold green]done[/] run {outcome.run_name}: test_acc {m['test_acc']:.4f} "
            f"({m['params']:,} params, {m['precision']}, {m['wall_seconds']:.1f}s) -> {outcome.model_dir}",
            highlight=False,
        )
        print_run_location(outcome)
