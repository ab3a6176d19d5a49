"""``scalelab models variants``: the registered model family with parameters and FLOPs.

Counting parameters and FLOPs means building each model, which needs torch (seconds to import).
For the default input (1x28x28, 10 classes) the counts come from ``variant_sizes.json``, written
by :func:`write_size_table` and kept current by ``tests/unit/test_models.py``; a variant whose
config changed since, or any other input, is counted live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

SIZE_TABLE = Path(__file__).with_name("variant_sizes.json")
DEFAULT_INPUT = {"in_chans": 1, "image_size": 28, "num_classes": 10}


def count_sizes(name: str, in_chans: int, image_size: int, num_classes: int) -> dict[str, int]:
    """Parameters and forward FLOPs of one variant (imports torch)."""
    from scalelab.models import count_flops, count_params, create_model

    model = create_model(name, in_chans=in_chans, num_classes=num_classes, image_size=image_size)
    return {"params": count_params(model), "flops": count_flops(model, in_chans, image_size)}


def size_table() -> dict[str, dict[str, Any]]:
    """The committed counts for :data:`DEFAULT_INPUT`: variant -> {config, params, flops}."""
    return json.loads(SIZE_TABLE.read_text()) if SIZE_TABLE.is_file() else {}


def write_size_table() -> Path:
    """Recount every variant for :data:`DEFAULT_INPUT` (after changing the model family)."""
    from scalelab.models import list_models, variant_config

    table = {
        name: {"config": variant_config(name), **count_sizes(name, **DEFAULT_INPUT)} for name in list_models()
    }
    SIZE_TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return SIZE_TABLE


def variants(
    pattern: Annotated[str, typer.Argument(help="Glob over variant names.")] = "*",
    in_chans: Annotated[int, typer.Option(help="Input channels.")] = 1,
    image_size: Annotated[int, typer.Option(help="Input size for FLOPs.")] = 28,
    num_classes: Annotated[int, typer.Option(help="Classes.")] = 10,
) -> list[dict[str, Any]]:
    """List registered variants with scales, depths, widths, parameters and FLOPs."""
    from scalelab.models import list_models, variant_config

    known = size_table() if (in_chans, image_size, num_classes) == tuple(DEFAULT_INPUT.values()) else {}
    table = Table(title=f"model variants ({in_chans}x{image_size}x{image_size}, {num_classes} classes)")
    for col in ("name", "task", "scales", "depths", "widths", "head", "params", "MFLOPs"):
        table.add_column(col, justify="right" if col in ("params", "MFLOPs", "scales") else "left")
    rows = []
    for name in list_models(pattern):
        cfg = variant_config(name)
        sizes = known.get(name) if known.get(name, {}).get("config") == cfg else None
        sizes = sizes or count_sizes(name, in_chans, image_size, num_classes)
        row = {
            "name": name,
            "task": cfg.get("task", "classification"),
            "scales": cfg.get("scales", 4),
            "depths": cfg.get("depths"),
            "widths": cfg.get("widths"),
            "head": cfg.get("head", "mean_logits"),
            "params": sizes["params"],
            "flops": sizes["flops"],
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


if __name__ == "__main__":  # python -m scalelab.models.commands: refresh variant_sizes.json
    print(f"wrote {write_size_table()}")
