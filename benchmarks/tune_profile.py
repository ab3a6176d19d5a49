"""Where the 16-trial ASHA search's wall time goes: one run of ``pipelines/digits.yaml``'s search
(tracking off, as ``benchmarks/tune.py`` runs it), with timers in the driver and in each trial.

    .venv/bin/python benchmarks/tune_profile.py [--recipe pipelines/digits.yaml] [--set KEY=VALUE ...]

Driver side: run_search start, each trial's start / result / end (Tune callback hooks), run_search
end. Trial side (a wrapper around the trainable, in the trial process): the trial function's start,
fit's model/loader set-up, per epoch train / val / checkpoint write / ``tune.report``, the final
test evaluation. Prints a breakdown in proportions of the wall and of trial-process time, and
writes the raw events to benchmarks/results/tune_profile.json. On a loaded machine read the
proportions, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from scalelab.config import load_recipe  # noqa: E402
from scalelab.config.loader import parse_override  # noqa: E402

EVENTS_ENV = "SCALELAB_PROFILE_EVENTS"


def profiled_trial(config, base, space, dataset=None, _inner=None, **kw):
    """Runs in the trial process: times the pieces of ``fit`` and appends them to a JSONL file."""
    import scalelab.train.loop as loop

    path = os.environ.get(EVENTS_ENV) or kw.pop("_events")
    pid = os.getpid()

    def emit(kind, **fields):
        with open(path, "a") as fh:
            fh.write(
                json.dumps({"t": time.time(), "cpu": time.process_time(), "pid": pid, "kind": kind, **fields})
                + "\n"
            )

    def timed(name, fn):
        if getattr(fn, "_profiled", False):
            return fn

        def wrapper(*a, **k):
            t0, c0 = time.time(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                emit(name, dt=time.time() - t0, thread_cpu=time.thread_time() - c0)

        wrapper._profiled = True
        return wrapper

    emit("trial_fn_start")
    loop.build_model = timed("build_model", loop.build_model)
    loop.build_loaders = timed("build_loaders", loop.build_loaders)
    loop.train_one_epoch = timed("train_epoch", loop.train_one_epoch)
    loop.evaluate_model = timed("evaluate", loop.evaluate_model)
    loop.save_training_checkpoint = timed("save_checkpoint", loop.save_training_checkpoint)
    loop.report_epoch = timed("report_epoch", loop.report_epoch)
    import ray.tune

    if not getattr(ray.tune.report, "_profiled", False):
        ray.tune.report = timed("tune_report", ray.tune.report)
    try:
        _inner(config, base, space, dataset)
    finally:
        emit("trial_fn_end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="pipelines/digits.yaml")
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS / "tune_profile.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = tempfile.mkdtemp(prefix="scalelab-prof-tune-")
    events_path = Path(out) / "events.jsonl"
    os.environ[EVENTS_ENV] = str(events_path)
    driver_events: list[dict] = []

    def mark(kind, **fields):
        driver_events.append({"t": time.time(), "cpu": time.process_time(), "kind": kind, **fields})

    import ray
    from ray import tune

    import scalelab.tune.driver as driver
    import scalelab.tune.tracking as tracking
    from scalelab.tune.trials import local_trial

    def patched_trainable(search, base, data):
        from functools import partial

        fn = partial(profiled_trial, _inner=local_trial, _events=str(events_path))
        fn.__name__ = "local_trial"  # Tune names trainables after the function
        trainable = tune.with_parameters(fn, base=base, space=search.space, dataset=data)
        return tune.with_resources(trainable, {"cpu": search.cpus_per_trial})

    driver._trainable = patched_trainable
    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        original = getattr(tracking.TrialTracker, hook)

        def wrapped(self, iteration, trials, trial, *a, _orig=original, _hook=hook, **k):
            result = k.get("result") or (a[0] if a else None)
            extra = {}
            if isinstance(result, dict):
                extra = {
                    "epoch": result.get("epoch"),
                    "time_this_iter_s": result.get("time_this_iter_s"),
                    "epoch_seconds": result.get("epoch_seconds"),
                }
            mark(_hook, trial=trial.trial_id, **extra)
            return _orig(self, iteration, trials, trial, *a, **k)

        setattr(tracking.TrialTracker, hook, wrapped)

    t0 = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_ray = time.time()
    overrides = {
        "search.output_dir": out,
        "tracking.enabled": False,
        **dict(parse_override(x) for x in args.set),
    }
    spec = load_recipe(args.recipe, overrides)
    started = time.time()
    mark("run_search_start")
    outcome = driver.run_search(spec, name="prof", quiet=True)
    ended = time.time()
    mark("run_search_end")
    ray.shutdown()

    trial_events = [json.loads(line) for line in events_path.read_text().splitlines()]
    report = analyse(driver_events, trial_events, started, ended)
    report.update(
        ray_init_s=t_ray - t0,
        overrides=overrides,
        best_test_acc=outcome.test_acc,
        trials=len([r for r in outcome.rows if r["status"] not in ("pruned", "error")]),
        epochs=sum(r.get("epochs") or 0 for r in outcome.rows if r["status"] not in ("pruned", "error")),
        load_average=os.getloadavg(),
    )
    Path(args.out).write_text(
        json.dumps({"summary": report, "driver": driver_events, "trial": trial_events}, indent=1)
    )
    for k, v in report.items():
        print(f"{k}: {v}")


def analyse(driver_events, trial_events, started, ended) -> dict:
    wall = ended - started
    starts = [e["t"] for e in driver_events if e["kind"] == "on_trial_start"]
    ends = [e["t"] for e in driver_events if e["kind"] in ("on_trial_complete", "on_trial_error")]
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    cpu: dict[str, float] = defaultdict(float)
    for e in trial_events:
        if "dt" in e:
            sums[e["kind"]] += e["dt"]
            cpu[e["kind"]] += e.get("thread_cpu", 0.0)
            counts[e["kind"]] += 1
    first_cpu = {}
    for e in sorted(trial_events, key=lambda e: e["t"]):
        if e["kind"] == "trial_fn_start" and e["pid"] not in first_cpu:
            first_cpu[e["pid"]] = e["cpu"]
    d_cpu = {e["kind"]: e["cpu"] for e in driver_events if e["kind"].startswith("run_search")}
    first_start_cpu = next((e["cpu"] for e in driver_events if e["kind"] == "on_trial_start"), None)
    # trial-process busy time: trial_fn_start -> trial_fn_end per trial
    busy = 0.0
    open_at: dict[int, float] = {}
    for e in sorted(trial_events, key=lambda e: e["t"]):
        if e["kind"] == "trial_fn_start":
            open_at[e["pid"]] = e["t"]
        elif e["kind"] == "trial_fn_end" and e["pid"] in open_at:
            busy += e["t"] - open_at.pop(e["pid"])
    # report_epoch includes save_checkpoint and tune_report; evaluate includes val (per epoch) + test
    ckpt = sums["save_checkpoint"]
    report_other = sums["report_epoch"] - ckpt
    parts = {
        "train_epochs": sums["train_epoch"],
        "evaluate (val per epoch + test at end)": sums["evaluate"],
        "save_checkpoint": ckpt,
        "tune.report (incl. checkpoint persist)": report_other,
        "build_model": sums["build_model"],
        "build_loaders": sums["build_loaders"],
    }
    accounted = sum(parts.values())
    two_core = 2 * wall
    return {
        "wall_s": round(wall, 2),
        "tune_start_to_first_trial_s": round(min(starts) - started, 2) if starts else None,
        "last_trial_end_to_return_s": round(ended - max(ends), 2) if ends else None,
        "trial_process_busy_s": round(busy, 2),
        "slot_seconds_(2 x wall)": round(two_core, 2),
        "busy_fraction_of_2_slots": round(busy / two_core, 3),
        "parts_s": {k: round(v, 2) for k, v in parts.items()},
        "parts_fraction_of_busy": {k: round(v / busy, 3) for k, v in parts.items()} if busy else {},
        "unaccounted_in_trial_s": round(busy - accounted, 2),
        "counts": dict(counts),
        "thread_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "trial_process_cpu_before_first_trial_fn_s": {str(k): round(v, 2) for k, v in first_cpu.items()},
        "driver_cpu_run_search_s": round(
            d_cpu.get("run_search_end", 0) - d_cpu.get("run_search_start", 0), 2
        ),
        "driver_cpu_to_first_trial_start_s": round(
            (first_start_cpu or 0) - d_cpu.get("run_search_start", 0), 2
        ),
    }


if __name__ == "__main__":
    main()
