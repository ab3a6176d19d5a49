"""search.match (trials held at the base recipe's budget by width) and the resolution augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalelab.config import load_recipe
from scalelab.config.specs import AugmentSpec, ModelSpec
from scalelab.data.loader import augment_batch
from scalelab.data.resolution import random_rescale, rescale_images
from scalelab.errors import ConfigError
from scalelab.tune.match import cost_function, match_widths, snapped, valid_width
from scalelab.tune.report import best_recipe, summary_table
from scalelab.tune.searchers import PointsSearcher, ScreenedSearcher
from scalelab.tune.space import MATCHED_WIDTHS, Screen, resolve_match, validate_space
from scalelab.tune.trials import trial_spec

DIGITS = Path(__file__).resolve().parents[2] / "pipelines" / "digits.yaml"


def recipe(space: dict, **search):
    overrides = {"search.space": space, "model.variant": "msresnet_tiny"}
    overrides.update({f"search.{k}": v for k, v in search.items()})
    return load_recipe(DIGITS, overrides)


@pytest.mark.parametrize(
    ("kind", "scales", "depths"),
    [
        *[("params", s, d) for s in (1, 2, 4) for d in ([1, 1, 1], [2, 2, 2])],
        ("flops", 1, [2, 2, 2]),  # each FLOP count is a forward pass under torch's counter: one case
    ],
)
def test_widths_are_solved_within_five_percent(kind, scales, depths):
    base = ModelSpec(variant="msresnet_tiny")
    cost = cost_function(kind, 1, 10, 8)
    target = cost(base)
    spec = base.model_copy(update={"scales": scales, "depths": depths})
    found = match_widths(spec, target, cost)
    assert found.ok and abs(found.cost / target - 1) <= 0.05
    assert all(valid_width(spec, w) for w in found.widths)
    assert found.cost == cost(spec.model_copy(update={"widths": found.widths}))  # the figure is the model's
    if scales == 4 and depths == [1, 1, 1]:
        assert found.widths == [32, 64, 128]  # the base itself needs no change
    if scales == 1:  # a plain block is costlier at the same width: the match narrows it
        assert found.widths[-1] < 128


def test_snapping_respects_the_split_and_unreachable_budgets_say_so():
    spec = ModelSpec(variant="msresnet_tiny")  # scales 4, bottleneck 0.5: round(w / 2) % 4 == 0
    low, high = snapped(spec, 30)
    assert low <= 30 <= high and valid_width(spec, low) and valid_width(spec, high)
    assert not any(valid_width(spec, w) for w in range(low + 1, high))
    assert snapped(spec, 32) == (32, 32)
    found = match_widths(spec, 100, cost_function("params", 1, 10, 8))
    assert not found.ok and found.cost > 100


def test_match_defaults_on_when_scales_is_searched_without_width_keys():
    assert resolve_match(recipe({"model.scales": {"choice": [1, 4]}}).search) == "params"
    assert resolve_match(recipe({"train.lr": {"uniform": [0.01, 0.1]}}).search) == "none"
    both = {"model.scales": {"choice": [1, 4]}, "model.base_width": {"choice": [8, 16]}}
    assert resolve_match(recipe(both).search) == "none"
    assert resolve_match(recipe({"model.scales": {"choice": [1, 4]}}, match="flops").search) == "flops"
    with pytest.raises(ConfigError, match="search.match='params'.*model.base_width"):
        validate_space(recipe(both, match="params"))


def test_screened_trials_carry_matched_widths_into_their_recipe(tmp_path):
    spec = recipe({"model.scales": {"choice": [1, 2, 4]}})
    base = spec.model_dump(mode="json")
    screen = Screen(base, spec.search.space, 1, 10, 8, match=resolve_match(spec.search))
    target = cost_function("params", 1, 10, 8)(spec.model)
    searcher = ScreenedSearcher(
        PointsSearcher([{"model.scales": s} for s in (1, 2, 4)]), screen, str(tmp_path / "p.jsonl"), 3
    )
    for i, scales in enumerate((1, 2, 4)):
        config = searcher.suggest(f"t{i}")
        assert MATCHED_WIDTHS in config
        cost = searcher.costs[f"t{i}"]
        assert cost["match_target"] == target and abs(cost["params"] / target - 1) <= 0.05
        assert cost["params"] == cost["matched_params"]
        trial = trial_spec(base, spec.search.space, config)  # what the trial process trains
        assert trial.model.scales == scales and trial.model.widths == cost["matched_widths"]
        # best.yaml gets the same widths back from the row's values
        values = {"model.scales": scales, MATCHED_WIDTHS: cost["matched_widths"]}
        assert best_recipe(spec, values, "note").model.widths == cost["matched_widths"]
    screen._target = 50  # no width brings a model this low: pruned, with the closest figure
    verdict = screen.check({"model.scales": 2})
    assert not verdict["ok"] and "cannot match search.match=params budget 50" in verdict["reason"]


def test_search_table_shows_the_matched_figure():
    from rich.console import Console

    rows = [
        {
            "trial_id": "a",
            "status": "completed",
            "val_acc": 0.9,
            "params": 39322,
            "match_ratio": 0.9991,
            "match_target": 39356,
            "model.scales": 1,
            MATCHED_WIDTHS: [22, 44, 90],
        },
    ]
    console = Console(width=200, record=True)
    console.print(summary_table(rows, ["model.scales", MATCHED_WIDTHS], "val_acc", match="params"))
    text = console.export_text()
    assert "params vs base" in text and "-0.1%" in text and "[22,44,90]" in text and "39,356" in text


def test_rescale_keeps_size_and_changes_resolution():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, ::2, :] = 255.0  # stripes one pixel high: gone at half resolution
    assert torch.equal(rescale_images(x, 1.0), x)
    half = rescale_images(x, 0.5)
    assert half.shape == x.shape and torch.allclose(half, torch.full_like(x, 127.5))
    dot = torch.zeros(1, 1, 8, 8)
    dot[..., 3:5, 3:5] = 1.0
    assert (rescale_images(dot, 1.5) > 0.25).sum() > (dot > 0.25).sum()  # enlarged about the centre
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_rescale(x, 1.0, 1.0, gen), x)
    mixed = random_rescale(x.repeat(16, 1, 1, 1), 0.5, 0.5, gen)
    assert torch.allclose(mixed, torch.full_like(mixed, 127.5))
    out = augment_batch(x, AugmentSpec(rescale=[0.5, 0.5]), gen)
    assert torch.allclose(out, half)
    with pytest.raises(ValueError, match="rescale must be"):
        AugmentSpec(rescale=[1.0, 0.5])


def test_matching_counts_the_new_architecture_keys():
    # the pyramid stem and the weighted head cost parameters; a partner that has them is matched with them
    keys = {"head": "weighted", "pyramid_stem": True}
    multi = ModelSpec(variant="msresnet_tiny", split_dilation=True, **keys)
    cost = cost_function("params", 1, 10, 8)
    target = cost(multi)
    assert target == cost(ModelSpec(variant="msresnet_tiny")) + 2 + 11 * multi.stem_width
    found = match_widths(ModelSpec(variant="msresnet_tiny", scales=1, **keys), target, cost)
    assert found.ok and found.cost == cost(
        ModelSpec(variant="msresnet_tiny", scales=1, widths=found.widths, **keys)
    )
