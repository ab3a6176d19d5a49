"""Search-space validation, config application, budget screening and searchers (no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.config import load_recipe
from scalelab.errors import ConfigError
from scalelab.tune.report import pick_best, sort_rows
from scalelab.tune.searchers import PointsSearcher, ScreenedSearcher, build_inner_searcher, grid_points
from scalelab.tune.space import Screen, apply_config, decode_config, to_tune_space, validate_space

DIGITS = Path(__file__).resolve().parents[2] / "pipelines" / "digits.yaml"


def recipe(space: dict, **search) -> object:
    overrides = {
        "search.space": space,
        "model.variant": "msresnet_tiny",
        **{f"search.{k}": v for k, v in search.items()},
    }
    return load_recipe(DIGITS, overrides)


def test_digits_search_space_is_valid():
    spec = load_recipe(DIGITS)
    validate_space(spec)
    assert {"model.scales", "model.depths", "model.head", "train.lr"} <= set(spec.search.space)


@pytest.mark.parametrize(
    ("space", "key", "words"),
    [
        ({"model.scale": {"choice": [1, 2]}}, "model.scale", "unknown key"),
        ({"modle.scales": {"choice": [1, 2]}}, "modle.scales", "unknown key"),
        ({"model": {"choice": [1]}}, "model", "whole section"),
        ({"search.num_samples": {"choice": [1]}}, "search.num_samples", "search section"),
        ({"model.scales": {"choice": [0, 2]}}, "model.scales", "greater than or equal to 1"),
        ({"model.head": {"choice": ["last", "sum"]}}, "model.head", "sum"),
        ({"train.epochs": {"uniform": [1, 5]}}, "train.epochs", "randint"),
        # scales=3 never divides msresnet_tiny's inner widths (16, 32, 64): no valid recipe
        ({"model.scales": {"choice": [2, 3]}}, "model.scales", "never makes a valid recipe"),
    ],
)
def test_bad_space_fails_naming_the_key(space, key, words):
    spec = recipe(space)
    with pytest.raises(ConfigError) as err:
        validate_space(spec)
    assert key in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"model.scales": {"choice": []}}, "choice must list at least one value"),
        ({"train.lr": {"loguniform": [0.3, 0.01]}}, "low 0.3 must be < high 0.01"),
        ({"train.lr": {"uniform": [0.1, 0.1]}}, "must be <"),
    ],
)
def test_empty_choice_and_inverted_range_fail_at_load(space, words):
    with pytest.raises(ConfigError) as err:
        recipe(space)
    key = next(iter(space))
    assert f"search.space.{key}" in str(err.value) and words in str(err.value)


def test_bad_space_fails_before_anything_is_launched(workdir, monkeypatch):
    import scalelab.data.catalog
    import scalelab.tune.driver as driver

    def never(*args, **kwargs):
        raise AssertionError("nothing may start for an invalid search space")

    monkeypatch.setattr(driver, "ensure_ray", never)
    monkeypatch.setattr(scalelab.data.catalog, "load_dataset", never)
    spec = recipe({"model.nope": {"choice": [1]}})
    with pytest.raises(ConfigError, match="model.nope"):
        driver.run_search(spec, name="never")
    assert not (workdir / ".scalelab" / "tune" / "never").exists()


def test_interacting_values_are_kept_when_some_combination_is_valid():
    # scales=4 with base width 8 gives inner widths 4, 8, 16 (ok); scales=8 needs base width >= 16
    spec = recipe({"model.scales": {"choice": [4, 8]}, "model.base_width": {"choice": [8, 16]}})
    validate_space(spec)


def test_apply_config_sets_dotted_keys_and_base_width():
    spec = recipe({"model.base_width": {"choice": [16]}})
    tree = apply_config(
        spec.model_dump(mode="json"), {"model.depths": [1, 2, 2, 1], "model.base_width": 8, "train.lr": 0.05}
    )
    assert tree["model"]["widths"] == [8, 16, 32, 64]
    assert tree["model"]["depths"] == [1, 2, 2, 1]
    assert tree["train"]["lr"] == 0.05


def test_list_choices_travel_encoded_and_decode_back():
    from ray.tune.search.sample import Categorical

    spec = recipe({"model.depths": {"choice": [[1, 1, 1], [2, 2, 2]]}, "model.scales": {"choice": [1, 2]}})
    tune_space = to_tune_space(spec.search.space)
    assert isinstance(tune_space["model.depths"], Categorical)
    assert tune_space["model.depths"].categories == ["[1, 1, 1]", "[2, 2, 2]"]
    assert tune_space["model.scales"].categories == [1, 2]
    assert decode_config(spec.search.space, {"model.depths": "[2, 2, 2]", "model.scales": 2}) == {
        "model.depths": [2, 2, 2],
        "model.scales": 2,
    }


def screen_for(spec, **budget) -> Screen:
    return Screen(spec.model_dump(mode="json"), spec.search.space, 1, 10, 8, **budget)


def test_screen_prunes_over_budget_with_the_reason():
    spec = recipe({"model.base_width": {"choice": [8, 64]}})
    small = screen_for(spec).check({"model.base_width": 8})
    big = screen_for(spec).check({"model.base_width": 64})
    assert small["params"] < big["params"] and small["flops"] < big["flops"]
    screen = screen_for(spec, max_params=small["params"] + 1, max_flops=None)
    assert screen.check({"model.base_width": 8})["ok"]
    verdict = screen.check({"model.base_width": 64})
    assert not verdict["ok"] and "search.max_params" in verdict["reason"]
    by_flops = screen_for(spec, max_flops=small["flops"]).check({"model.base_width": 64})
    assert not by_flops["ok"] and "search.max_flops" in by_flops["reason"]


def test_screened_searcher_never_suggests_over_budget_configs(tmp_path):
    spec = recipe({"model.base_width": {"choice": [8, 64]}, "model.scales": {"choice": [1, 2]}})
    small = screen_for(spec).check({"model.base_width": 8, "model.scales": 2})["params"]
    points = grid_points(spec.search.space, repeats=1, seed=0)
    assert len(points) == 4
    record = tmp_path / "pruned.jsonl"
    searcher = ScreenedSearcher(
        PointsSearcher(points),
        screen_for(spec, max_params=small * 2),
        str(record),
        max_concurrent=2,
        metric="val_acc",
        mode="max",
    )
    got = [searcher.suggest(f"t{i}") for i in range(2)]
    assert all(c["model.base_width"] == 8 for c in got)
    assert searcher.suggest("t2") is None  # two live trials: the concurrency limit holds
    searcher.on_trial_complete("t0", {"val_acc": 0.5})
    searcher.on_trial_complete("t1", {"val_acc": 0.6})
    assert searcher.suggest("t3") == "FINISHED"
    pruned = [json.loads(line) for line in record.read_text().splitlines()]
    assert [p["config"]["model.base_width"] for p in pruned] == [64, 64]
    assert all("over budget" in p["reason"] for p in pruned)

    state = tmp_path / "state.pkl"
    searcher.save(str(state))
    restored = ScreenedSearcher(PointsSearcher([]), screen_for(spec), str(record), 1)
    restored.restore(str(state))
    assert len(restored.pruned) == 2 and restored.inner.next_index == 4


def test_screened_optuna_tells_pruned_configs_and_goes_on(tmp_path):
    spec = recipe({"model.base_width": {"choice": [8, 64]}, "train.lr": {"loguniform": [0.01, 0.3]}}, seed=3)
    small = screen_for(spec).check({"model.base_width": 8, "train.lr": 0.1})["params"]
    inner = build_inner_searcher(spec.search)
    searcher = ScreenedSearcher(inner, screen_for(spec, max_params=small), str(tmp_path / "p.jsonl"), 1)
    searcher.set_search_properties("val_acc", "max", to_tune_space(spec.search.space))
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        assert config["model.base_width"] == 8
        searcher.on_trial_complete(f"t{i}", {"val_acc": 0.5, "training_iteration": 1})
    states = {t.state.name for t in inner._ot_study.trials}
    assert "COMPLETE" in states
    assert ("PRUNED" in states) == bool(searcher.pruned)


def test_grid_repeats_and_samples_ranges():
    spec = recipe({"model.scales": {"choice": [1, 2, 4]}, "train.lr": {"loguniform": [0.01, 0.1]}})
    points = grid_points(spec.search.space, repeats=2, seed=0)
    assert len(points) == 6
    assert sorted({p["model.scales"] for p in points}) == [1, 2, 4]
    assert all(0.01 <= p["train.lr"] <= 0.1 for p in points)
    assert points == grid_points(spec.search.space, repeats=2, seed=0)


def test_rows_sort_by_metric_and_best_prefers_full_budget():
    rows = [
        {"trial_id": "a", "status": "stopped", "val_acc": 0.99},
        {"trial_id": "b", "status": "completed", "val_acc": 0.95},
        {"trial_id": "c", "status": "pruned", "val_acc": None},
        {"trial_id": "d", "status": "completed", "val_acc": 0.97},
    ]
    assert [r["trial_id"] for r in sort_rows(rows, "val_acc", "max")] == ["a", "d", "b", "c"]
    assert [r["trial_id"] for r in sort_rows(rows, "val_acc", "min")] == ["b", "d", "a", "c"]
    assert pick_best(rows, "val_acc", "max")["trial_id"] == "d"
    assert pick_best(rows[:1], "val_acc", "max")["trial_id"] == "a"


def test_ties_on_the_metric_go_to_the_lower_val_loss():
    rows = [
        {"trial_id": "a", "status": "completed", "val_acc": 1.0, "val_loss": 0.40},
        {"trial_id": "b", "status": "completed", "val_acc": 1.0, "val_loss": 0.21},
        {"trial_id": "c", "status": "completed", "val_acc": 1.0},  # no loss reported: after those with one
        {"trial_id": "d", "status": "completed", "val_acc": 0.99, "val_loss": 0.01},  # the metric comes first
    ]
    assert [r["trial_id"] for r in sort_rows(rows, "val_acc", "max")] == ["b", "a", "c", "d"]
    assert pick_best(rows, "val_acc", "max")["trial_id"] == "b"
    # ranking by the loss itself: no second loss tie-break, ids stay the last key
    by_loss = sort_rows([{**r, "val_loss": 0.3} for r in rows], "val_loss", "min")
    assert [r["trial_id"] for r in by_loss] == ["a", "b", "c", "d"]


def test_trial_base_checkpoints_at_asha_rungs_and_uses_channels_last_on_cpu(tmp_path):
    """Trials checkpoint every grace_period epochs under ASHA (every rung is a multiple of it; fit
    always checkpoints the last epoch), and train channels_last on CPU unless the recipe says."""
    from scalelab.tune.driver import trial_base

    space = {"train.lr": {"loguniform": [0.01, 0.3]}}
    base = trial_base(recipe(space, grace_period=2, reduction_factor=3, max_epochs=10), tmp_path)
    assert base["train"]["checkpoint_every"] == 2 and base["train"]["epochs"] == 10
    assert base["train"]["channels_last"] is True
    # the grace period never exceeds the budget; an explicit search.checkpoint_every wins
    assert trial_base(recipe(space, grace_period=4, max_epochs=3), tmp_path)["train"]["checkpoint_every"] == 3
    assert trial_base(recipe(space, checkpoint_every=1), tmp_path)["train"]["checkpoint_every"] == 1
    # without ASHA: the recipe's own train.checkpoint_every
    fifo = load_recipe(
        DIGITS, {"search.space": space, "search.scheduler": "none", "train.checkpoint_every": 3}
    )
    assert trial_base(fifo, tmp_path)["train"]["checkpoint_every"] == 3
    # the recipe's train.channels_last, then search.channels_last, decide before the CPU default
    nchw = load_recipe(DIGITS, {"search.space": space, "train.channels_last": False})
    assert trial_base(nchw, tmp_path)["train"]["channels_last"] is False
    assert trial_base(recipe(space, channels_last=False), tmp_path)["train"]["channels_last"] is False
    gpu = load_recipe(DIGITS, {"search.space": space, "train.use_gpu": True})
    assert trial_base(gpu, tmp_path)["train"]["channels_last"] is None  # bf16/fp16 decides on a GPU


def test_fit_checkpoints_every_n_epochs_and_the_last(tmp_path):
    """What trial_checkpoint_every relies on: fit checkpoints epochs n, 2n, ... and always the last."""
    from scalelab.data.catalog import load_dataset
    from scalelab.train.loop import fit

    spec = load_recipe(
        DIGITS,
        {
            "model.variant": "msresnet_tiny",
            "train.epochs": 3,
            "train.checkpoint_every": 2,
            "train.batch_size": 256,  # 4 steps an epoch: the test is about when checkpoints come
            "train.threads": 1,
            "tracking.enabled": False,
            "data.data_dir": str(tmp_path / "data"),
        },
    )
    seen = []
    fit(spec, load_dataset(spec.data), report=lambda m, ckpt: seen.append((m["epoch"], ckpt is not None)))
    assert seen == [(1, False), (2, True), (3, True)]


def test_callback_usage_count_is_skipped_with_usage_stats_off(monkeypatch):
    """Tune imports Ray's MLflow/W&B/Comet/Aim integrations only to count callbacks for usage stats;
    with usage stats off (scalelab's default) the search driver skips that count."""
    from ray.air._internal import usage

    from scalelab.tune.driver import skip_callback_usage_count

    monkeypatch.setattr(usage, "tag_callbacks", usage.tag_callbacks)  # restored after the test
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    assert not skip_callback_usage_count()  # usage stats on: Ray's own count stays
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert skip_callback_usage_count()
    from ray.tune import Callback

    with pytest.MonkeyPatch.context() as mp:  # counting would import the integrations: not once
        mp.setattr(usage, "_count_callbacks", lambda cbs: pytest.fail("callbacks were counted"))
        assert usage.tag_callbacks([Callback()]) is False


def test_an_ended_search_keeps_only_each_trials_newest_checkpoint(tmp_path):
    from scalelab.tune.driver import prune_trial_checkpoints

    tune_dir = tmp_path / "tune"
    kept = {"trial_a": "checkpoint_000010", "trial_b": "checkpoint_000002", "trial_c": "checkpoint_000000"}
    for trial, names in {
        "trial_a": ["checkpoint_000009", "checkpoint_000002", "checkpoint_000010"],  # by index, not age
        "trial_b": ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"],
        "trial_c": ["checkpoint_000000"],
    }.items():
        for n in names:
            (tune_dir / trial / n).mkdir(parents=True)
            (tune_dir / trial / n / "model.safetensors").write_bytes(b"x")
        (tune_dir / trial / "result.json").write_text("{}")
    assert prune_trial_checkpoints(tune_dir) == 4
    for trial, newest in kept.items():
        assert sorted(p.name for p in (tune_dir / trial).iterdir()) == [newest, "result.json"]
    assert prune_trial_checkpoints(tune_dir) == 0  # idempotent
