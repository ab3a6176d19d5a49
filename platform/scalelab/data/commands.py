"""``scalelab data``: prepare, and (with DVC) push, pull, versions, verify."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Datasets: prepare and version them.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare_cmd(
        recipe: str = typer.Argument(..., help="Recipe YAML whose data section to prepare."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. data.split_seed=1."),
    ) -> None:
        """Materialise the recipe's dataset into data_dir/name in the canonical form."""
        from scalelab.config import load_recipe
        from scalelab.data import prepare, read_prepared

        spec = load_recipe(recipe, overrides or [])
        path = prepare(spec.data)
        ds = read_prepared(path)
        sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
        console.print(f"prepared {ds.name} -> {path}: {sizes}; {ds.num_classes} classes, "
                      f"{ds.image_size}x{ds.image_size}x{ds.channels}", highlight=False)
