"""``scalelab models variants``: the registered model family with parameters and FLOPs."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table


def variants(
    pattern: Annotated[str, typer.Argument(help="Glob over variant names.")] = "*",
    in_chans: Annotated[int, typer.Option(help="Input channels.")] = 1,
    image_size: Annotated[int, typer.Option(help="Input size for FLOPs.")] = 28,
    num_classes: Annotated[int, typer.Option(help="Classes.")] = 10,
) -> list[dict[str, Any]]:
    """List registered variants with scales, depths, widths, parameters and FLOPs."""
    from scalelab.models import count_flops, count_params, create_model, list_models, variant_config

    table = Table(title=f"model variants ({in_chans}x{image_size}x{image_size}, {num_classes} classes)")
    for col in ("name", "task", "scales", "depths", "widths", "head", "params", "MFLOPs"):
        table.add_column(col, justify="right" if col in ("params", "MFLOPs", "scales") else "left")
    rows = []
    for name in list_models(pattern):
        cfg = variant_config(name)
        model = create_model(name, in_chans=in_chans, num_classes=num_classes, image_size=image_size)
        row = {
            "name": name,
            "task": cfg.get("task", "classification"),
            "scales": cfg.get("scales", 4),
            "depths": cfg.get("depths"),
            "widths": cfg.get("widths"),
            "head": cfg.get("head", "mean_logits"),
            "params": count_params(model),
            "flops": count_flops(model, in_chans, image_size),
        }
        rows.append(row)
        table.add_row(
            name,
            row["task"],
            str(row["scales"]),
            str(row["depths"]),
            str(row["widths"]),
            row["head"],
            f"{row['params']:,}",
            f"{row['flops'] / 1e6:.1f}",
        )
    Console(width=160).print(table)
    return rows
