"""Parameters and FLOPs of every registered variant, cached so that listing them needs no torch.

Counting builds each network and runs one forward pass under torch's FLOP counter: about 3 s with
torch's import, for figures that change only when the code does. The first call computes them for
all variants at the given input size and writes them to ``$XDG_CACHE_HOME/scalelab`` (default
``~/.cache/scalelab``); later calls read that file while its key still matches. The key hashes
every source file of the ``scalelab`` package, torch's installed version and the input size, so
an edit anywhere in the package (a block, a variant, a ModelSpec default) or another torch
computes afresh. Nothing here imports torch unless the figures must be computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from scalelab.config.variants import list_models, variant_config

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalelab"


def cache_key(in_chans: int, image_size: int, num_classes: int) -> str:
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    digest.update(f"torch={torch_version} in_chans={in_chans} image_size={image_size}".encode())
    digest.update(f" num_classes={num_classes}".encode())
    return digest.hexdigest()[:20]


def _count(in_chans: int, image_size: int, num_classes: int) -> dict[str, dict[str, int]]:
    from scalelab.models.factory import count_flops, count_params, create_model

    counts = {}
    for name in list_models():
        model = create_model(name, in_chans=in_chans, num_classes=num_classes, image_size=image_size)
        counts[name] = {"params": count_params(model), "flops": count_flops(model, in_chans, image_size)}
    return counts


def variant_counts(
    in_chans: int = 1, image_size: int = 28, num_classes: int = 10
) -> dict[str, dict[str, int]]:
    """``{variant: {"params": n, "flops": n}}`` for every registered variant (cached, see above)."""
    path = cache_dir() / f"variants-{cache_key(in_chans, image_size, num_classes)}.json"
    try:
        counts = json.loads(path.read_text())
        if set(counts) == set(list_models()):
            return counts
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: compute afresh
    counts = _count(in_chans, image_size, num_classes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(counts, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only home still lists the variants, only without the cache
    return counts


def variant_rows(
    pattern: str = "*", in_chans: int = 1, image_size: int = 28, num_classes: int = 10
) -> list[dict[str, Any]]:
    """One row per variant matching ``pattern``: its config fields with params and FLOPs."""
    counts = variant_counts(in_chans, image_size, num_classes)
    rows = []
    for name in list_models(pattern):
        cfg = variant_config(name)
        rows.append(
            {
                "name": name,
                "task": cfg.get("task", "classification"),
                "scales": cfg.get("scales", 4),
                "depths": cfg.get("depths"),
                "widths": cfg.get("widths"),
                "head": cfg.get("head", "mean_logits"),
                **counts[name],
            }
        )
    return rows
