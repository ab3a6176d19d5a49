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
    from scalelab.models.summary import variant_rows

    table = Table(title=f"model variants ({in_chans}x{image_size}x{image_size}, {num_classes} classes)")
    for col in ("name", "task", "scales", "depths", "widths", "head", "params", "MFLOPs"):
        table.add_column(col, justify="right" if col in ("params", "MFLOPs", "scales") else "left")
    rows = list(variant_rows(pattern, in_chans=in_chans, image_size=image_size, num_classes=num_classes))
    for row in rows:
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
    return rows
