"""``scalelab models``: the registered model family with parameters and FLOPs."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(help="Model family (variants) and the model registry.", no_args_is_help=True)
    app.add_typer(models_app, name="models")

    from scalelab.registry.commands import add_model_commands

    add_model_commands(models_app)

    @models_app.command("variants")
    def variants(
        pattern: str = typer.Argument("*", help="Glob over variant names."),
        in_chans: int = typer.Option(1, help="Input channels."),
        image_size: int = typer.Option(28, help="Input size for FLOPs."),
        num_classes: int = typer.Option(10, help="Classes."),
    ) -> None:
        """List registered variants with scales, depths, widths, parameters and FLOPs."""
        from scalelab.models.summary import variant_rows

        table = Table(title=f"model variants ({in_chans}x{image_size}x{image_size}, {num_classes} classes)")
        for col in ("name", "task", "scales", "depths", "widths", "head", "params", "MFLOPs"):
            table.add_column(col, justify="right" if col in ("params", "MFLOPs", "scales") else "left")
        for row in variant_rows(pattern, in_chans=in_chans, image_size=image_size, num_classes=num_classes):
            table.add_row(
                row["name"],
                row["task"],
                str(row["scales"]),
                str(row["depths"]),
                str(row["widths"]),
                row["head"],
                f"{row['params']:,}",
                f"{row['flops'] / 1e6:.1f}",
            )
        Console(width=160).print(table)
