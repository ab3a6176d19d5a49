"""``run_search``: a Ray Tune search over a recipe's ``search.space``, resumable by name.

Everything lands in ``search.output_dir/NAME``: Tune's experiment state and trial folders
(``tune/``), the recipe as searched (``recipe.yaml``, so ``--resume NAME`` needs nothing
else), ``trials.json`` (trial -> MLflow run, startup overhead), ``pruned.jsonl`` (configs
never launched, with the reason), ``results.csv`` sorted by the metric, ``best.yaml`` (a
recipe ``scalelab train`` accepts as is) and the plots. The search itself is one MLflow parent
run with a nested child run per trial (see :mod:`scalelab.tune.tracking`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.cluster.session import connect_ray
from scalelab.config.loader import dump_recipe, flatten, load_recipe, spec_hash
from scalelab.config.specs import RecipeSpec, SearchSpec
from scalelab.errors import ConfigError
from scalelab.tune.space import MATCHED_WIDTHS, Screen, decode_config, resolve_match, validate_space

log = logging.getLogger("scalelab.tune")
DEFAULT_OUTPUT_DIR = SearchSpec().output_dir
# Tune's own experiment folder inside the search folder. Tune re-uploads what it restored into its
# experiment folder, so the driver's files (trials.json, results, best.yaml) must live outside it.
TUNE_DIR = "tune"


@dataclass
class SearchOutcome:
    name: str
    search_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_yaml: Path | None
    test_acc: float | None
    parent_run_id: str | None
    wall_seconds: float
    interrupted: bool
    pruned: list[dict[str, Any]] = field(default_factory=list)


def max_epochs(spec: RecipeSpec) -> int:
    return spec.search.max_epochs or spec.train.epochs


def trial_dirname(trial) -> str:
    """Short, stable trial folder names (Tune's default embeds the config, brackets and all)."""
    return f"trial_{trial.trial_id}"


def trial_base(spec: RecipeSpec, search_dir: Path) -> dict[str, Any]:
    """The recipe every trial starts from: absolute paths (trial processes run in their own folder),
    the search's epoch budget, no tracking of its own (the driver logs trials as child runs)."""
    base = spec.model_dump(mode="json")
    base["data"]["data_dir"] = str(Path(spec.data.data_dir).resolve())
    if spec.data.source:
        base["data"]["source"] = str(Path(spec.data.source).resolve())
    base["train"].update(
        epochs=max_epochs(spec),
        run_name=None,
        output_dir=str(search_dir / "outputs"),
        storage_path=str(search_dir / "train"),
        threads=spec.train.threads or max(1, int(spec.search.cpus_per_trial)),
        checkpoint_every=trial_checkpoint_every(spec),
        channels_last=trial_channels_last(spec),
    )
    base["tracking"]["enabled"] = False
    return base


def trial_checkpoint_every(spec: RecipeSpec) -> int:
    """Epochs between a trial's checkpoints (``search.checkpoint_every``; see its description).

    ASHA stops a trial only at a rung (``grace_period * reduction_factor**k`` epochs) or at the
    budget, and ``fit`` always checkpoints the last epoch: checkpointing every ``grace_period``
    epochs keeps a checkpoint of every epoch a trial can end on (the best trial's test evaluation
    reads it) without writing and persisting one per epoch."""
    search = spec.search
    if search.checkpoint_every is not None:
        return search.checkpoint_every
    if search.scheduler == "asha":
        return min(search.grace_period, max_epochs(spec))
    return spec.train.checkpoint_every


def trial_channels_last(spec: RecipeSpec) -> bool | None:
    """The trials' ``train.channels_last``: the recipe's when set, else ``search.channels_last``,
    else on for CPU trials (fp32 convolutions on these small maps take ~25-30% less CPU in
    channels_last on an AVX2 host; bf16 runs use it already)."""
    if spec.train.channels_last is not None:
        return spec.train.channels_last
    if spec.search.channels_last is not None:
        return spec.search.channels_last
    return True if not spec.train.use_gpu else None


def ensure_ray() -> bool:
    """Tune's environment, then the Ray session (:func:`scalelab.cluster.session.connect_ray`:
    $RAY_ADDRESS, the `scalelab up` stack's head, or a local Ray). True if connected here."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # every epoch checkpoints; Tune's warning about the resulting state snapshots is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's default loggers are CSV, JSON and TensorBoard: _build_tuner passes the first two (its
    # result.json / progress.csv stay), and tensorboardX is never imported (~1.7 s of a loaded
    # driver's start, before the first trial is launched) nor written per result.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    started = connect_ray(log_to_driver=False, configure_logging=False)
    skip_callback_usage_count()  # after connect_ray: it sets scalelab's usage-stats default
    return started


def skip_callback_usage_count() -> bool:
    """With Ray's usage stats off (scalelab's default, ``RAY_USAGE_STATS_ENABLED=0``), skip Tune's
    count of the run's callbacks for them: to count, ``tune.run`` imports Ray's MLflow, W&B, Comet
    and Aim integrations (mlflow alone ~1-2 s, ~5 s on a loaded host, in the driver before the
    first trial is launched) for a tag that is never sent. True if skipped."""
    try:
        from ray._common.usage.usage_lib import usage_stats_enabled
        from ray.air._internal import usage as air_usage
    except ImportError:  # another Ray layout: leave it alone
        return False
    if usage_stats_enabled() or not hasattr(air_usage, "tag_callbacks"):
        return False
    air_usage.tag_callbacks = _no_callback_tag
    return True


def _no_callback_tag(callbacks) -> bool:
    return False


def resolve_search_dir(output_dir: str, name: str) -> Path:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"search name {name!r} may only hold letters, digits, '-', '_' and '.'")
    return Path(output_dir).resolve() / name


def _existing(output_dir: str) -> str:
    root = Path(output_dir)
    names = sorted(p.name for p in root.iterdir() if (p / "recipe.yaml").is_file()) if root.is_dir() else []
    return ", ".join(names) or "none"


def run_search(
    spec: RecipeSpec | None,
    resume: str | None = None,
    name: str | None = None,
    *,
    points: list[dict[str, Any]] | None = None,
    console=None,
    quiet: bool = False,
) -> SearchOutcome:
    """Run (or with ``resume=NAME`` continue) the search of ``spec.search``; see the module doc.

    ``points``: evaluate exactly these Tune configs (encoded as Tune passes them) instead of
    asking the search algorithm; used to re-run a search's trials at another budget.
    """
    from ray.tune import Tuner

    from scalelab.data.catalog import load_dataset

    started = time.perf_counter()
    output_dir = spec.search.output_dir if spec is not None else DEFAULT_OUTPUT_DIR
    if resume:
        name = resume
        search_dir = resolve_search_dir(output_dir, name)
        if not Tuner.can_restore(str(search_dir / TUNE_DIR)) or not (search_dir / "recipe.yaml").is_file():
            raise ConfigError(
                f"no search named {name!r} to resume in {output_dir} "
                f"(searches there: {_existing(output_dir)})"
            )
        spec = load_recipe(search_dir / "recipe.yaml")
    else:
        if spec is None:
            raise ConfigError("give a recipe to start a search, or --resume NAME to continue one")
        validate_space(spec)  # before anything starts
        name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        search_dir = resolve_search_dir(output_dir, name)
        if (search_dir / "recipe.yaml").exists():
            raise ConfigError(
                f"a search named {name!r} already exists in {output_dir}; continue it with --resume {name} "
                f"or pick another --name"
            )
        search_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(spec, search_dir / "recipe.yaml")
    assert spec is not None

    data = load_dataset(spec.data)  # prepared once here; trials read it from the object store / disk
    started_ray = ensure_ray()
    try:
        tracking = _start_parent_run(spec, name, search_dir)
        tuner = _build_tuner(spec, name, search_dir, data, tracking, points, resume is not None, quiet)
        interrupted = False
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
            grid = tuner.get_results()
        outcome = _finish(spec, name, search_dir, grid, data, tracking, started, console, quiet)
        outcome.interrupted = outcome.interrupted or interrupted
        if not outcome.interrupted:
            prune_trial_checkpoints(search_dir / TUNE_DIR)
        return outcome
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def prune_trial_checkpoints(tune_dir: Path) -> int:
    """Delete every trial checkpoint but the trial's newest, once the search has ended; returns how
    many were deleted.

    Tune's own retention (``CheckpointConfig(num_to_keep=1)``) deleted a trial's older checkpoint as
    soon as a newer one came in. Its experiment snapshot, which a resumed search restores each
    unfinished trial from, is saved only every few seconds. A driver killed in between left a
    snapshot naming a checkpoint that was already gone, and the resumed trial failed ("Could not
    recover from checkpoint as it does not exist on storage anymore"). So a search keeps all its
    checkpoints while it runs (``search.checkpoint_every`` epochs apart), and what is left when it
    ends is what ``num_to_keep=1`` kept: the newest of each trial, which its results point at.
    """
    import shutil

    removed = 0
    for trial in tune_dir.glob("trial_*"):
        checkpoints = sorted(p for p in trial.glob("checkpoint_*") if p.is_dir())  # zero-padded index
        for old in checkpoints[:-1]:
            shutil.rmtree(old, ignore_errors=True)
            removed += 1
    return removed


def _start_parent_run(spec: RecipeSpec, name: str, search_dir: Path) -> dict[str, Any] | None:
    """The search's MLflow parent run (reopened on resume); None when tracking is off or down."""
    if not spec.tracking.enabled:
        return None
    from scalelab.tracking.uri import resolve_tracking_uri
    from scalelab.tune.tracking import MlflowSearch, TrackingState

    uri = resolve_tracking_uri(spec.tracking.uri)
    state = TrackingState(search_dir / "trials.json")
    try:
        ml = MlflowSearch(uri, spec.tracking.experiment, search_dir)
        parent = state.data.get("parent_run_id")
        run_id = ml.start_run(
            name,
            {"scalelab.kind": "search", "scalelab.search": name, "scalelab.spec_hash": spec_hash(spec)},
            run_id=parent,
        )
    except Exception as exc:  # noqa: BLE001 - a search runs without tracking rather than not at all
        log.warning("MLflow at %s unreachable (%s): the search runs untracked", uri, exc)
        return None
    if not parent:
        state.data["parent_run_id"] = run_id
        state.save()
        params = {
            k: v for k, v in flatten(spec.model_dump(mode="json")).items() if not k.startswith("search.space")
        }
        params["search.match"] = resolve_match(spec.search)  # the default, resolved
        params.update(
            {
                f"search.space.{k}": json.dumps(v.model_dump(exclude_none=True))
                for k, v in spec.search.space.items()
            }
        )
        ml.logger(run_id).log_params(params)
        ml.logger(run_id).flush(timeout_s=10)
    return {
        "uri": uri,
        "experiment": spec.tracking.experiment,
        "parent_run_id": run_id,
        "space": spec.search.space,
    }


def _build_tuner(spec, name, search_dir, data, tracking, points, resume, quiet):
    import ray.tune
    from ray.tune import CheckpointConfig, FailureConfig, TuneConfig, Tuner
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from scalelab.tune.space import to_tune_space
    from scalelab.tune.tracking import TrialTracker

    search = spec.search
    base = trial_base(spec, search_dir)
    trainable = _trainable(search, base, data)
    if resume:
        return Tuner.restore(
            str(search_dir / TUNE_DIR), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    epochs = max_epochs(spec)
    tracker = TrialTracker(
        str(search_dir),
        name,
        list(search.space),
        base,
        search.space,
        search.metric,
        epochs,
        tracking,
        quiet,
        search.trial_mode,
    )
    return Tuner(
        trainable,
        param_space=to_tune_space(search.space),
        tune_config=TuneConfig(
            metric=search.metric,
            mode=search.mode,
            search_alg=_screened_searcher(search, base, data, search_dir, points),
            scheduler=_scheduler(search, epochs),
            num_samples=_num_samples(search, points),
            max_concurrent_trials=search.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
            # worker mode keeps a fresh driver per trial: stopping one must end its TorchTrainer
            reuse_actors=search.trial_mode == "local" and search.reuse_trial_processes,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(search_dir),
            # CSV + JSON: Tune's experiment analysis reads them; no TensorBoard (see ensure_ray)
            callbacks=[tracker, CSVLoggerCallback(), JsonLoggerCallback()],
            verbose=0,
            # every checkpoint is kept while the search runs, pruned when it ends (prune_trial_checkpoints)
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
        ),
    )


def _trainable(search, base: dict[str, Any], data):
    """What one trial runs: in the trial's own process (local), or a TorchTrainer (worker)."""
    from ray import tune

    from scalelab.tune.trials import local_trial, worker_trial

    if search.trial_mode == "local":
        trainable = tune.with_parameters(local_trial, base=base, space=search.space, dataset=data)
        return tune.with_resources(trainable, {"cpu": search.cpus_per_trial})
    _require_worker_mode()
    trainable = tune.with_parameters(worker_trial, base=base, space=search.space, data_version=data.version)
    # the driver function only waits on its TorchTrainer, whose workers reserve their own CPUs
    return tune.with_resources(trainable, {"cpu": 0.01})


def _screened_searcher(search, base: dict[str, Any], data, search_dir: Path, points):
    """The search algorithm, behind a screen that prunes shapes over the params/FLOPs budget."""
    from scalelab.tune.searchers import ScreenedSearcher, build_inner_searcher

    screen = Screen(
        base,
        search.space,
        data.channels,
        data.num_classes,
        data.image_size,
        search.max_params,
        search.max_flops,
        resolve_match(search),
    )
    return ScreenedSearcher(
        build_inner_searcher(search, points),
        screen,
        str(search_dir / "pruned.jsonl"),
        search.max_concurrent_trials,
        search.metric,
        search.mode,
    )


def _num_samples(search, points) -> int:
    from scalelab.tune.searchers import grid_size

    if points is not None:
        return len(points)
    if search.algorithm == "grid":
        return grid_size(search.space) * search.num_samples
    return search.num_samples


def _scheduler(search, epochs: int):
    """ASHA stops weak trials early at rungs of ``grace_period * reduction_factor**k`` epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs,
        grace_period=min(search.grace_period, epochs),
        reduction_factor=search.reduction_factor,
    )


def _require_worker_mode() -> None:
    try:
        from scalelab.train.ray_trainer import build_torch_trainer  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "search.trial_mode 'workers' needs scalelab.train.ray_trainer.build_torch_trainer, which is not "
            f"available ({exc}); use search.trial_mode=local"
        ) from None


def _rows(spec: RecipeSpec, grid, search_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per trial (from Tune's results + trials.json) and one per pruned config."""
    from scalelab.tune.report import SHOWN_METRICS
    from scalelab.tune.tracking import TrackingState

    search = spec.search
    trials = TrackingState(search_dir / "trials.json").data["trials"]
    screen_costs = _searcher_costs(search_dir)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        rec = trials.get(trial_id, {})
        metrics = result.metrics or {}
        status = rec.get("status") or ("error" if result.error else "running")
        values = decode_config(search.space, result.config or rec.get("config") or {})
        checkpoint = result.checkpoint.path if result.checkpoint else metrics.get("checkpoint_path")
        cost = screen_costs.get(trial_id, {})
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                search.metric: metrics.get(search.metric),
                # both validation figures when reported: one ranks, the other breaks ties and is shown
                **{k: metrics[k] for k in SHOWN_METRICS if k in metrics and k != search.metric},
                "epochs": metrics.get("epoch", rec.get("epochs")),
                "params": metrics.get("params") or cost.get("params"),
                "flops": cost.get("flops"),
                "startup_s": rec.get("startup_s"),
                **{k: cost[k] for k in ("match_target", "match_ratio") if k in cost},
                **values,
                "reason": str(result.error).splitlines()[-1][:300] if result.error else "",
                "config": result.config,
                "checkpoint": checkpoint,
            }
        )
    pruned, seen = [], set()
    path = search_dir / "pruned.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec["searcher_id"] in seen:
            continue
        seen.add(rec["searcher_id"])
        pruned.append(rec)
        rows.append(
            {
                "trial_id": rec["id"]
                if rec["id"] not in {r["trial_id"] for r in rows}
                else rec["searcher_id"],
                "status": "pruned",
                "params": rec["params"],
                "flops": rec["flops"],
                **decode_config(search.space, rec["config"]),
                "reason": rec["reason"],
                "config": rec["config"],
                "searcher_id": rec["searcher_id"],
            }
        )
    return rows, pruned


def _searcher_costs(search_dir: Path) -> dict[str, dict[str, Any]]:
    """Params / FLOPs the screen computed per launched trial, from the searcher's saved state."""
    import pickle

    states = sorted((search_dir / TUNE_DIR).glob("searcher-state-*.pkl"))  # by the session time in the name
    for path in reversed(states):
        try:
            state = pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - costs are a convenience column
            continue
        if isinstance(state, dict) and "costs" in state:
            return state["costs"]
    return {}


def evaluate_checkpoint(path: str, data, spec: RecipeSpec) -> float:
    """Test accuracy (mAP@0.5 for detection) of a trial checkpoint (a model bundle folder) on the
    held-out test split, normalised with the bundle's own statistics."""
    from scalelab.artifacts.evaluate import evaluate_predictor
    from scalelab.artifacts.predictor import Predictor
    from scalelab.train.runtime import select_runtime

    predictor = Predictor.from_bundle(path)
    return evaluate_predictor(predictor, data.splits["test"], runtime=select_runtime(spec.train)).accuracy


def _finish(spec, name, search_dir, grid, data, tracking, started, console, quiet) -> SearchOutcome:
    from rich.console import Console

    from scalelab.tune.report import (
        best_recipe,
        pick_best,
        plot_search,
        print_summary,
        sort_rows,
        write_results_csv,
    )

    search = spec.search
    console = console or Console(soft_wrap=True)  # paths and URLs whole, to copy
    rows, pruned = _rows(spec, grid, search_dir)
    rows = sort_rows(rows, search.metric, search.mode)
    interrupted = any(r["status"] == "running" for r in rows)
    best = pick_best(rows, search.metric, search.mode)
    best_yaml, test_acc = None, None
    if best is not None:
        values = {k: best[k] for k in [*search.space, MATCHED_WIDTHS] if k in best}
        if best.get("checkpoint"):
            try:
                test_acc = evaluate_checkpoint(best["checkpoint"], data, spec)
                best["test_acc"] = test_acc
            except Exception as exc:  # noqa: BLE001 - the search result stands without it
                log.warning("could not evaluate the best trial's checkpoint %s: %s", best["checkpoint"], exc)
        note = f"Best of search {name}: trial {best['trial_id']}, {search.metric}={best[search.metric]:.4f}."
        best_yaml = dump_recipe(best_recipe(spec, values, note), search_dir / "best.yaml")
    match = resolve_match(search)
    shown_keys = [*search.space, *([MATCHED_WIDTHS] if match != "none" else [])]
    csv_path = write_results_csv(rows, shown_keys, search_dir / "results.csv", search.metric)
    plots = plot_search(rows, search.space, search.metric, search_dir)
    wall = time.perf_counter() - started
    summary = {
        "name": name,
        "trials": sum(r["status"] != "pruned" for r in rows),
        "pruned": len(pruned),
        "interrupted": interrupted,
        "wall_seconds": wall,
        "best_trial": best["trial_id"] if best else None,
        "best_" + search.metric: best[search.metric] if best else None,
        "best_test_acc": test_acc,
        "parent_run_id": tracking["parent_run_id"] if tracking else None,
        "match": match,
        "match_target": next((r["match_target"] for r in rows if r.get("match_target")), None),
    }
    (search_dir / "search.json").write_text(json.dumps(summary, indent=2))
    if tracking:
        _finish_tracking(tracking, search_dir, name, rows, best, summary, [csv_path, *plots, best_yaml])
    if not quiet:
        print_summary(console, rows, shown_keys, search.metric, match=match)
        _print_outcome(console, summary, best, best_yaml, search_dir, tracking, search.metric)
    return SearchOutcome(
        name,
        search_dir,
        rows,
        best,
        best_yaml,
        test_acc,
        tracking["parent_run_id"] if tracking else None,
        wall,
        interrupted,
        pruned,
    )


def _finish_tracking(tracking, search_dir, name, rows, best, summary, artifacts) -> None:
    from scalelab.tune.tracking import MlflowSearch, TrackingState

    try:
        ml = MlflowSearch(tracking["uri"], tracking["experiment"], search_dir)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow unreachable at the end of the search (%s); results are in %s", exc, search_dir)
        return
    state = TrackingState(search_dir / "trials.json")
    parent = tracking["parent_run_id"]
    for rec in (r for r in rows if r["status"] == "pruned"):  # never launched: a closed child run each
        if rec["searcher_id"] in state.data["pruned_runs"]:
            continue
        values = decode_config(tracking["space"], rec["config"])
        run_id = ml.start_run(
            f"{name}/{rec['trial_id']}",
            {
                "mlflow.parentRunId": parent,
                "scalelab.kind": "trial",
                "scalelab.search": name,
                "scalelab.trial_status": "pruned",
                "scalelab.pruned_reason": rec["reason"],
            },
        )
        ml.logger(run_id).log_params({f"search.{k}": v for k, v in values.items()})
        metrics = {k: rec[k] for k in ("params", "flops") if rec.get(k) is not None}
        if metrics:
            ml.logger(run_id).log_metrics(metrics, step=0)
        ml.end_run(run_id, "KILLED", flush_s=5)
        state.data["pruned_runs"][rec["searcher_id"]] = run_id
    state.save()
    if best is not None:
        best_run = state.data["trials"].get(best["trial_id"], {}).get("run_id")
        if best_run:
            ml.logger(best_run).set_tags({"scalelab.best_trial": "true"})
            if best.get("test_acc") is not None:
                ml.logger(best_run).log_metrics(
                    {"test_acc": best["test_acc"]}, step=int(best.get("epochs") or 0)
                )
            ml.logger(best_run).flush(timeout_s=10)
        ml.logger(parent).set_tags(
            {"scalelab.best_trial_id": best["trial_id"], "scalelab.best_run_id": best_run or ""}
        )
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ml.logger(parent).log_metrics(metrics, step=0)
    for path in artifacts:
        if path is not None and Path(path).is_file():
            ml.logger(parent).log_artifact(path)
    ml.end_run(parent, "KILLED" if summary["interrupted"] else "FINISHED", flush_s=30)


def _print_outcome(console, summary, best, best_yaml, search_dir, tracking, metric) -> None:
    line = (
        f"[bold]{summary['trials']}[/] trial(s), {summary['pruned']} config(s) never launched "
        "(budget/invalid), "
        f"{summary['wall_seconds']:.1f}s"
    )
    console.print(line, highlight=False)
    if summary["interrupted"]:
        console.print(
            f"[yellow]interrupted[/]: continue with `scalelab tune --resume {summary['name']}`",
            highlight=False,
        )
    if best is not None:
        test = f", test_acc {best['test_acc']:.4f}" if best.get("test_acc") is not None else ""
        console.print(
            f"[bold green]best[/] trial {best['trial_id']}: {metric} {best[metric]:.4f}{test} "
            f"({best.get('params') or 0:,} params) -> {best_yaml} (train it: scalelab train {best_yaml})",
            highlight=False,
        )
    console.print(f"results: {search_dir / 'results.csv'}", highlight=False)
    if tracking:
        from scalelab.tracking.ui import run_location

        lines = run_location(tracking["uri"], tracking["parent_run_id"])
        console.print(lines[0].replace("MLflow run", "MLflow parent run"), highlight=False)
        for line in lines[1:]:
            console.print(line, highlight=False)
