"""Typed specs and recipe loading."""

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
