"""A model bundle of a tiny classifier on 8x8 one-channel images, for unit tests."""

from __future__ import annotations

from pathlib import Path

import torch

from scalelab.artifacts.bundle import save_model_bundle
from scalelab.config.specs import RecipeSpec

CLASSES = ["a", "b", "c"]


def toy_meta(variant: str = "msresnet_tiny", **overrides) -> dict:
    """Bundle metadata as training writes it: the recipe, the dataset's shape and statistics, fp32."""
    recipe = RecipeSpec.model_validate({"name": "t", "model": {"variant": variant, **overrides}})
    return {
        "recipe": recipe.model_dump(mode="json"),
        "dataset": {
            "name": "t",
            "classes": CLASSES,
            "channels": 1,
            "num_classes": 3,
            "image_size": 8,
            "mean": [0.5],
            "std": [0.25],
        },
        "precision": "fp32",
    }


def save_toy_bundle(
    model: torch.nn.Module, folder: Path, variant: str = "msresnet_tiny", **overrides
) -> Path:
    """``model`` (built from ``variant`` + ``overrides`` for 1 x 8 x 8 inputs and 3 classes) as a bundle."""
    return save_model_bundle(model, folder, toy_meta(variant, **overrides))
