"""Ray Tune search on digits: wall time and best accuracy of the 16-trial ASHA search, trial startup
overhead (local vs worker-group mode), and what ASHA saves against the same trials at full budget.

    .venv/bin/python benchmarks/tune.py [--recipe pipelines/digits.yaml] [--overhead-trials 3]

Writes benchmarks/results/tune.json. Compute is counted as epochs x forward FLOPs/image of each
trial's model (the data is the same for all), so the saved fraction does not depend on how busy
the machine was; wall times do (quote them with the machine's load).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_results  # noqa: E402
from scalelab.config import load_recipe  # noqa: E402
from scalelab.tune.driver import run_search  # noqa: E402


def launched(outcome) -> list[dict]:
    return [r for r in outcome.rows if r["status"] not in ("pruned", "error")]


def compute(rows: list[dict]) -> float:
    return sum((r.get("epochs") or 0) * (r.get("flops") or 1) for r in rows)


def best_metric(rows: list[dict], metric: str, mode: str, status: str | None = None) -> float:
    values = [
        r[metric]
        for r in rows
        if isinstance(r.get(metric), float) and (status is None or r["status"] == status)
    ]
    return (max if mode == "max" else min)(values) if values else float("nan")


def overhead(recipe: str, out: str, mode: str, trials: int, reuse: bool = True) -> tuple[float, list[float]]:
    """Median scheduling -> first training step over ``trials`` one-epoch trials run one at a time.

    ``reuse``: ``search.reuse_trial_processes`` (local mode): after the first trial, each runs in
    the process the one before it finished in; off, every trial starts a process of its own.
    """
    spec = load_recipe(
        recipe,
        {
            "search.output_dir": out,
            "search.trial_mode": mode,
            "search.num_samples": trials,
            "search.max_epochs": 1,
            "search.scheduler": "none",
            "search.max_concurrent_trials": 1,
            "search.reuse_trial_processes": reuse,
            "model.variant": "msresnet_tiny",
            "tracking.enabled": False,
            "train.workers": 1,
            "search.space": {"train.lr": {"loguniform": [0.02, 0.3]}},
        },
    )
    outcome = run_search(spec, name=f"overhead-{mode}-{'reuse' if reuse else 'fresh'}", quiet=True)
    values = [r["startup_s"] for r in launched(outcome) if isinstance(r.get("startup_s"), float)]
    return median(values), values


def main() -> None:
    refuse_while_stack_runs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="pipelines/digits.yaml")
    parser.add_argument("--overhead-trials", type=int, default=3)
    parser.add_argument("--skip-workers", action="store_true", help="only local mode (no worker groups)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = tempfile.mkdtemp(prefix="scalelab-bench-tune-")

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        base = {"search.output_dir": out, "tracking.enabled": False}
        spec = load_recipe(args.recipe, base)
        metric, mode = spec.search.metric, spec.search.mode
        started = time.perf_counter()
        asha = run_search(spec, name="asha", quiet=True)
        asha_wall = time.perf_counter() - started
        asha_rows = launched(asha)
        print(f"ASHA search: {len(asha_rows)} trials in {asha_wall:.1f}s, best test_acc {asha.test_acc}")

        full_spec = load_recipe(args.recipe, {**base, "search.scheduler": "none"})
        started = time.perf_counter()
        full = run_search(full_spec, name="full", points=[r["config"] for r in asha_rows], quiet=True)
        full_wall = time.perf_counter() - started
        full_rows = launched(full)
        print(f"full budget: {len(full_rows)} trials in {full_wall:.1f}s, best test_acc {full.test_acc}")

        local_overhead, local_values = overhead(args.recipe, out, "local", args.overhead_trials)
        fresh_overhead, fresh_values = overhead(args.recipe, out, "local", args.overhead_trials, reuse=False)
        workers_overhead, workers_values = (None, [])
        if not args.skip_workers:
            workers_overhead, workers_values = overhead(args.recipe, out, "workers", args.overhead_trials)
    finally:
        ray.shutdown()

    asha_epochs = sum(r.get("epochs") or 0 for r in asha_rows)
    full_epochs = sum(r.get("epochs") or 0 for r in full_rows)
    figures = {
        "trials": len(asha_rows),
        "pruned_configs": len(asha.pruned),
        "wall_seconds": round(asha_wall, 1),
        "search_metric": f"{metric} ({mode})",
        f"best_{metric}": best_metric(asha_rows, metric, mode, "completed"),
        "best_val_acc": asha.best.get("val_acc") if asha.best else None,
        "best_test_acc": asha.test_acc,
        "best_trial": asha.best["trial_id"] if asha.best else None,
        "best_config": {k: asha.best.get(k) for k in spec.search.space} if asha.best else None,
        "per_trial_overhead_s_local": round(local_overhead, 3),
        "per_trial_overhead_s_workers": round(workers_overhead, 3) if workers_overhead is not None else None,
        "overhead_samples_local": [round(v, 3) for v in local_values],
        "per_trial_overhead_s_local_fresh_process": round(fresh_overhead, 3),
        "overhead_samples_local_fresh_process": [round(v, 3) for v in fresh_values],
        "overhead_samples_workers": [round(v, 3) for v in workers_values],
        "overhead_in_16_trial_search_s_median": median(
            [r["startup_s"] for r in asha_rows if isinstance(r.get("startup_s"), float)] or [float("nan")]
        ),
        "asha_compute_saved_fraction": round(1 - compute(asha_rows) / compute(full_rows), 4),
        "asha_epochs_saved_fraction": round(1 - asha_epochs / full_epochs, 4),
        # positive: ASHA missed some of the full budget's best (for a loss: ASHA's best is higher)
        "asha_best_metric_gap": round(
            (1 if mode == "max" else -1)
            * (best_metric(full_rows, metric, mode) - best_metric(asha_rows, metric, mode, "completed")),
            4,
        )
        + 0.0,  # no -0.0 for a loss tie
        "asha_best_test_acc_gap": round((full.test_acc or 0) - (asha.test_acc or 0), 4),
        "full_budget_wall_seconds": round(full_wall, 1),
        f"full_budget_best_{metric}": best_metric(full_rows, metric, mode),
        "full_budget_best_val_acc": full.best.get("val_acc") if full.best else None,
        "full_budget_best_test_acc": full.test_acc,
        "asha_epochs": asha_epochs,
        "full_epochs": full_epochs,
        "notes": (
            "overhead = scheduling -> first training step (first epoch report minus its duration), "
            f"median of {args.overhead_trials} one-epoch msresnet_tiny trials run one at a time "
            "(local: trial processes reused, as searches run; local_fresh_process: one process per "
            "trial, search.reuse_trial_processes=false); "
            "gaps are full-budget best minus ASHA best (positive: ASHA missed accuracy); "
            "see load_average_at_end for how busy the machine was"
        ),
        "load_average_at_end": os.getloadavg()[0],
    }
    write_results("tune", figures)
    for k, v in figures.items():
        if not isinstance(v, (list, dict)):
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
