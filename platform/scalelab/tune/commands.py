"""``scalelab tune``."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 140)  # the results table needs room


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        recipe: str = typer.Argument(
            None, help="Recipe YAML with a search: section, e.g. pipelines/digits.yaml."
        ),
        overrides: list[str] = typer.Argument(
            None, help="Dotted overrides: search.num_samples=4 train.epochs=2."
        ),
        resume: str = typer.Option(None, "--resume", help="Continue the interrupted search of this name."),
        name: str = typer.Option(None, "--name", help="Name of a new search (default: recipe name + time)."),
    ) -> None:
        """Search scales, depths, widths and optimiser settings with Ray Tune (ASHA + Optuna)."""
        from scalelab.config import load_recipe
        from scalelab.errors import ConfigError
        from scalelab.tune.driver import run_search

        if resume and name and name != resume:
            raise ConfigError("--resume NAME continues that search; do not give --name as well")
        spec = load_recipe(recipe, overrides or []) if recipe else None
        if recipe is None and not resume:
            raise ConfigError("give a recipe (scalelab tune pipelines/digits.yaml) or --resume NAME")
        if spec is not None and resume and overrides:
            console.print(
                "[yellow]note[/]: a resumed search keeps the recipe it started with; overrides are ignored",
                highlight=False,
            )
        if spec is not None and not resume:
            s = spec.search
            console.print(
                f"[bold]tune[/] {spec.name}: {s.algorithm} x {s.num_samples} sample(s), "
                f"scheduler {s.scheduler}, "
                f"{s.max_epochs or spec.train.epochs} epoch(s) max, {s.max_concurrent_trials} at once, "
                f"trial mode {s.trial_mode}; space: {', '.join(s.space) or 'empty'}",
                highlight=False,
            )
        outcome = run_search(spec, resume=resume, name=name, console=console)
        if outcome.interrupted:
            raise typer.Exit(130)
