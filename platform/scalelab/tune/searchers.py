"""Searchers: Optuna (TPE or random) or a grid, behind a screen that never launches a bad config.

:class:`ScreenedSearcher` wraps any Tune ``Searcher``. Each suggestion is screened first
(:class:`scalelab.tune.space.Screen`): a config over the compute budget, or one that is not a
valid recipe, is recorded as *pruned* (with the reason, in ``pruned.jsonl``), told to the inner
searcher as pruned (so TPE learns to avoid it) and replaced by the next suggestion; Tune never
creates a trial for it. The wrapper also limits concurrency itself, so its whole state (inner
searcher, live trials, pruned records) is saved with the experiment and survives a resume.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import random
import time
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from scalelab.config.specs import ParamSpace, SearchSpec
from scalelab.tune.space import Screen, encoded

log = logging.getLogger("scalelab.tune")
MAX_PRUNED_IN_A_ROW = 200  # consecutive screened-out suggestions before the search gives up


class PointsSearcher(Searcher):
    """Suggests a fixed list of configs in order (a grid, or given points), then FINISHED."""

    def __init__(self, points: list[dict[str, Any]], metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.points = points
        self.next_index = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next_index >= len(self.points):
            return Searcher.FINISHED
        point = self.points[self.next_index]
        self.next_index += 1
        return dict(point)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))


def grid_points(space: dict[str, ParamSpace], repeats: int, seed: int) -> list[dict[str, Any]]:
    """Every combination of the choice keys, ``repeats`` times; range keys sampled (seeded) per point."""
    rng = random.Random(seed)
    choice_keys = [k for k, d in space.items() if d.choice is not None]
    grids = [[json.dumps(v) if encoded(space[k]) else v for v in space[k].choice] for k in choice_keys]
    points = []
    for _ in range(repeats):
        for combo in itertools.product(*grids):
            point = dict(zip(choice_keys, combo, strict=True))
            for key, dim in space.items():
                if dim.uniform is not None:
                    point[key] = rng.uniform(*dim.uniform)
                elif dim.loguniform is not None:
                    lo, hi = dim.loguniform
                    point[key] = lo * (hi / lo) ** rng.random()
                elif dim.randint is not None:
                    point[key] = rng.randrange(*dim.randint)
            points.append(point)
    return points


def grid_size(space: dict[str, ParamSpace]) -> int:
    size = 1
    for dim in space.values():
        if dim.choice is not None:
            size *= len(dim.choice)
    return size


def build_inner_searcher(search: SearchSpec, points: list[dict[str, Any]] | None = None) -> Searcher:
    if points is not None:
        return PointsSearcher(points, search.metric, search.mode)
    if search.algorithm == "grid":
        return PointsSearcher(
            grid_points(search.space, search.num_samples, search.seed), search.metric, search.mode
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (
        optuna.samplers.TPESampler(seed=search.seed)
        if search.algorithm == "optuna"
        else optuna.samplers.RandomSampler(seed=search.seed)
    )
    return OptunaSearch(sampler=sampler, metric=search.metric, mode=search.mode)


class ScreenedSearcher(Searcher):
    """Screens every suggestion of ``inner`` (budget, validity) and limits concurrency."""

    def __init__(
        self,
        inner: Searcher,
        screen: Screen,
        record_path: str,
        max_concurrent: int,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.inner = inner
        self.screen = screen
        self.record_path = record_path
        self.max_concurrent = max_concurrent
        self.live: set[str] = set()
        self.alias: dict[str, str] = {}  # Tune trial id -> the inner searcher's id for it
        self.pruned: list[dict[str, Any]] = []
        self.costs: dict[str, dict[str, Any]] = {}  # trial id -> params / flops of its model
        self.gave_up: str | None = None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True  # handled here: Tune's ConcurrencyLimiter passes everything through

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.gave_up:
            return Searcher.FINISHED
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        for attempt in range(MAX_PRUNED_IN_A_ROW):
            inner_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            config = self.inner.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            verdict = self.screen.check(config)
            if verdict["ok"]:
                self.alias[trial_id] = inner_id
                self.live.add(trial_id)
                self.costs[trial_id] = {
                    k: v for k, v in verdict.items() if k not in ("ok", "reason", "config")
                }
                if "matched_widths" in verdict:
                    log.info(
                        "trial %s: widths %s match the base budget (%s, %+.1f%%)",
                        trial_id,
                        verdict["matched_widths"],
                        self.screen.match,
                        100 * (verdict["match_ratio"] - 1),
                    )
                return verdict.get("config", config)  # with the matched widths, when search.match is on
            self._record_pruned(inner_id, config, verdict)
            self.inner.on_trial_complete(inner_id, result=None, error=False)  # Optuna: PRUNED
        self.gave_up = (
            f"{MAX_PRUNED_IN_A_ROW} suggestions in a row were over budget or invalid; the budget "
            f"(search.max_params / search.max_flops) leaves almost nothing of the space"
        )
        log.warning("search stops suggesting: %s", self.gave_up)
        return Searcher.FINISHED

    def _record_pruned(self, inner_id: str, config: dict[str, Any], verdict: dict[str, Any]) -> None:
        record = {
            "id": f"pruned_{len(self.pruned):04d}",
            "searcher_id": inner_id,
            "config": config,
            "reason": verdict["reason"],
            "params": verdict["params"],
            "flops": verdict["flops"],
            "time": time.time(),
        }
        self.pruned.append(record)
        log.info("not launching %s: %s", config, verdict["reason"])
        try:
            with open(self.record_path, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:  # the record also lives in the searcher state
            log.warning("could not append to %s: %s", self.record_path, exc)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.alias:
            self.inner.on_trial_result(self.alias[trial_id], result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if trial_id in self.alias:
            self.inner.on_trial_complete(self.alias[trial_id], result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))
