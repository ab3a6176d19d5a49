"""Typed specs and recipe loading.

The names below load their module on first use (PEP 562): the light modules of this package
(``console``, ``variants``, ``settings``) are imported by ``scalelab --help`` and ``scalelab models
variants``, which need neither pydantic nor the specs (about a third of a second to import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalelab import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
