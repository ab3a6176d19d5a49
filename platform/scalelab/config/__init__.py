"""Typed specs and recipe loading.

The names below load their module on first use (PEP 562): the light modules of this package
(``console``, ``variants``, ``settings``) are imported by ``scalelab --help`` and ``scalelab models
variants``, which need neither pydantic nor the specs (about a third of a second to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scalelab.config.loader import (
        apply_overrides,
        dump_recipe,
        flatten,
        load_recipe,
        parse_override,
        recipe_to_dict,
        spec_hash,
        validate_recipe,
    )
    from scalelab.config.specs import (
        AugmentSpec,
        DataSpec,
        ModelSpec,
        ParamSpace,
        PromotionSpec,
        RecipeSpec,
        SearchSpec,
        ServeSpec,
        TrackingSpec,
        TrainSpec,
    )

__all__ = [
    "AugmentSpec",
    "DataSpec",
    "ModelSpec",
    "ParamSpace",
    "PromotionSpec",
    "RecipeSpec",
    "SearchSpec",
    "ServeSpec",
    "TrackingSpec",
    "TrainSpec",
    "apply_overrides",
    "dump_recipe",
    "flatten",
    "load_recipe",
    "parse_override",
    "recipe_to_dict",
    "spec_hash",
    "validate_recipe",
]
_HOME = {name: "specs" if name[0].isupper() else "loader" for name in __all__}  # the module of each


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
