"""Named variants: each is a name and a config (a dict of ModelSpec fields)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

_VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_model(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Decorator: the function's name is the variant name, its return value the config."""
    if fn.__name__ in _VARIANTS:
        raise ValueError(f"model variant {fn.__name__!r} is registered twice")
    _VARIANTS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    _load_variants()
    names = sorted(n for n in _VARIANTS if fnmatch.fnmatch(n, pattern))
    if task is not None:
        names = [n for n in names if _VARIANTS[n]().get("task", "classification") == task]
    return names


def variant_config(name: str) -> dict[str, Any]:
    _load_variants()
    if name not in _VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; known: {', '.join(sorted(_VARIANTS))}")
    return {"variant": name, **_VARIANTS[name]()}


def _load_variants() -> None:
    import scalelab.models.variants  # noqa: F401  (registers on import)
