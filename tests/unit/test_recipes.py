"""Every recipe in pipelines/ (and job spec in jobs/) loads and validates."""

from pathlib import Path

import pytest

from scalelab.config import load_recipe

REPO = Path(__file__).resolve().parents[2]

RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path: Path):
    spec = load_recipe(path)
    assert spec.name


def test_digits_is_embedded_default():
    assert (REPO / "pipelines" / "digits.yaml") in RECIPES
