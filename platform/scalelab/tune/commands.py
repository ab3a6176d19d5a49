"""``scalelab tune``."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from scalelab.config.project import absolute, in_project

if TYPE_CHECKING:
    from scalelab.tune.driver import SearchOutcome

console = Console(width=None if sys.stdout.isatty() else 140)  # the results table needs room


def tune(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe YAML with a search: section, e.g. pipelines/digits.yaml.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides: search.num_samples=4 train.epochs=2.")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue the interrupted search of this name.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Name of a new search (default: recipe name + time).")
    ] = None,
    *,
    quiet: bool = False,
) -> SearchOutcome:
    """Search scales, depths, widths and optimiser settings with Ray Tune (ASHA + Optuna)."""
    from scalelab.config import load_recipe
    from scalelab.errors import ConfigError
    from scalelab.tune.driver import run_search

    if resume and name and name != resume:
        raise ConfigError("--resume NAME continues that search; do not give --name as well")
    recipe = absolute(recipe) if recipe else None
    with in_project(recipe) as root:
        spec = load_recipe(recipe, overrides or []) if recipe else None
        if recipe is None and not resume:
            raise ConfigError("give a recipe (scalelab tune pipelines/digits.yaml) or --resume NAME")
        if spec is not None and resume and overrides:
            console.print(
                "[yellow]note[/]: a resumed search keeps the recipe it started with; overrides are ignored",
                highlight=False,
            )
        if spec is not None and not resume and not quiet:  # quiet (the pipeline): the results only
            s = spec.search
            console.print(
                f"[bold]tune[/] {spec.name}: {s.algorithm} x {s.num_samples} sample(s), "
                f"scheduler {s.scheduler}, "
                f"{s.max_epochs or spec.train.epochs} epoch(s) max, {s.max_concurrent_trials} at once, "
                f"trial mode {s.trial_mode}; space: {', '.join(s.space) or 'empty'}",
                highlight=False,
            )
        outcome = run_search(spec, resume=resume, name=name, console=None if quiet else console)
    outcome.search_dir = root / outcome.search_dir  # unchanged when already absolute
    outcome.best_yaml = root / outcome.best_yaml if outcome.best_yaml else None
    return outcome


def tune_command(*args: Any, **kwargs: Any) -> None:
    if tune(*args, **kwargs).interrupted:
        raise typer.Exit(130)


tune_command.__signature__ = inspect.signature(tune)  # the CLI shows tune's arguments and options
tune_command.__doc__ = tune.__doc__
