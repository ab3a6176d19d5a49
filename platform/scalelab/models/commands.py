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
        from scalelab.models import count_flops, count_params, create_model, list_models, variant_config

        table = Table(title=f"model variants ({in_chans}x{image_size}x{image_size}, {num_classes} classes)")
        for col in ("name", "task", "scales", "depths", "widths", "head", "params", "MFLOPs"):
            table.add_column(col, justify="right" if col in ("params", "MFLOPs", "scales") else "left")
        for name in list_models(pattern):
            cfg = variant_config(name)
            model = create_model(name, in_chans=in_chans, num_classes=num_classes, image_size=image_size)
            flops = count_flops(model, in_chans, image_size)
            table.add_row(
                name,
                cfg.get("task", "classification"),
                str(cfg.get("scales", 4)),
                str(cfg.get("depths")),
                str(cfg.get("widths")),
                cfg.get("head", "mean_logits"),
                f"{count_params(model):,}",
                f"{flops / 1e6:.1f}",
            )
        Console(width=160).print(table)
