"""MLflow for a search: one parent run, one nested child run per trial, logged from the driver.

Ray's MLflow integration has no nested runs (ray-project/ray#19978) and a trial stopped by ASHA is
killed mid-report, so trials never log themselves: :class:`TrialTracker`, a Tune ``Callback`` in
the driver, opens a child run when a trial starts (tag ``mlflow.parentRunId``), logs each epoch
as it is reported, and closes the run when the trial ends, whichever way it ends. Calls go through
``scalelab.tracking.resilient.ResilientLogger``: a tracking outage never stops a search. The
trial -> run map lives in ``trials.json`` beside the results, so a resumed search continues the
same runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from scalelab.config.loader import flatten

log = logging.getLogger("scalelab.tune")
EPOCH_METRICS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_seconds",
    "images_per_s",
    "params",
)


class TrackingState:
    """``trials.json``: per trial its child run id, when it was scheduled, its startup overhead."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"parent_run_id": None, "trials": {}, "pruned_runs": {}}
        if self.path.is_file():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except ValueError:
                log.warning("%s is unreadable; starting a fresh trial map", self.path)

    def trial(self, trial_id: str) -> dict[str, Any]:
        return self.data["trials"].setdefault(trial_id, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class MlflowSearch:
    """Client side of a search's MLflow runs (parent + children), all through ResilientLogger."""

    def __init__(self, uri: str, experiment: str, search_dir: str | Path) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.search_dir = Path(search_dir)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.loggers: dict[str, Any] = {}

    def logger(self, run_id: str):
        from scalelab.tracking.resilient import ResilientLogger

        if run_id not in self.loggers:
            spill = self.search_dir / "unsent" / f"{run_id}.json"
            self.loggers[run_id] = ResilientLogger(self.client, run_id, spill_path=spill)
        return self.loggers[run_id]

    def start_run(self, name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED", flush_s: float = 10.0) -> None:
        report = self.logger(run_id).flush(timeout_s=flush_s)
        if report.lost:
            log.warning(
                "run %s: %d log call(s) were not recorded (%s)",
                run_id,
                len(report.lost),
                report.spill_path or "not saved",
            )
        try:
            self.client.set_terminated(run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - a closed run is cosmetic; never fail the search
            log.warning("could not close MLflow run %s: %s", run_id, exc)


class TrialTracker(Callback):
    """Tune callback in the driver: console lines, startup overhead, and the child MLflow runs."""

    def __init__(
        self,
        search_dir: str,
        search_name: str,
        space_keys: list[str],
        base: dict[str, Any],
        space: dict[str, Any],
        metric: str,
        max_epochs: int,
        tracking: dict[str, Any] | None,
        quiet: bool = False,
        trial_mode: str = "local",
    ) -> None:
        self.search_dir = search_dir
        self.search_name = search_name
        self.space_keys = space_keys
        self.base = base
        self.space = space
        self.metric = metric
        self.max_epochs = max_epochs
        self.tracking = tracking  # {"uri", "experiment", "parent_run_id"} or None
        self.quiet = quiet
        self.trial_mode = trial_mode
        self._state: TrackingState | None = None
        self._mlflow: MlflowSearch | None = None
        self._mlflow_failed = False

    def __getstate__(self) -> dict[str, Any]:  # pickled into the Tuner state: no clients, no files
        state = self.__dict__.copy()
        state.update(_state=None, _mlflow=None, _mlflow_failed=False)
        return state

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def state(self) -> TrackingState:
        if self._state is None:
            self._state = TrackingState(Path(self.search_dir) / "trials.json")
        return self._state

    @property
    def mlflow(self) -> MlflowSearch | None:
        if self.tracking is None or self._mlflow_failed:
            return None
        if self._mlflow is None:
            try:
                self._mlflow = MlflowSearch(
                    self.tracking["uri"], self.tracking["experiment"], self.search_dir
                )
            except Exception as exc:  # noqa: BLE001 - training goes on without tracking
                log.warning(
                    "MLflow at %s unreachable (%s); trials are not tracked", self.tracking["uri"], exc
                )
                self._mlflow_failed = True
                return None
        return self._mlflow

    def _print(self, text: str) -> None:
        if not self.quiet:
            from rich.console import Console

            Console().print(text, highlight=False)

    def _describe(self, config: dict[str, Any]) -> str:
        from scalelab.tune.space import decode_config

        values = decode_config(self.space, config)
        return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())

    # -- Tune callback hooks ------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        rec = self.state.trial(trial.trial_id)
        rec["scheduled_at"] = time.time()
        rec["first_result"] = False
        rec["config"] = trial.config
        starts = rec.setdefault("starts", 0)
        rec["starts"] = starts + 1
        self._print(f"[cyan]start[/]  {trial.trial_id}  {self._describe(trial.config)}")
        ml = self.mlflow
        if ml is not None:
            try:
                run_id = ml.start_run(
                    f"{self.search_name}/{trial.trial_id}",
                    {
                        "mlflow.parentRunId": self.tracking["parent_run_id"],
                        "scalelab.kind": "trial",
                        "scalelab.search": self.search_name,
                        "scalelab.trial_id": trial.trial_id,
                    },
                    run_id=rec.get("run_id"),
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("could not open an MLflow run for trial %s: %s", trial.trial_id, exc)
            else:
                if not rec.get("run_id"):
                    rec["run_id"] = run_id
                    self._log_params(ml, run_id, trial.config)
        self.state.save()

    def _log_params(self, ml: MlflowSearch, run_id: str, config: dict[str, Any]) -> None:
        from scalelab.tune.space import apply_config, decode_config

        values = decode_config(self.space, config)
        params = flatten(apply_config(self.base, values))
        params = {k: v for k, v in params.items() if not k.startswith("search.")}
        params.update({f"search.{k}": v for k, v in values.items()})
        ml.logger(run_id).log_params(params)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        rec = self.state.trial(trial.trial_id)
        now = time.time()
        if not rec.get("first_result"):
            # first training step ~ when the first epoch's report arrived minus that epoch's duration
            rec["first_result"] = True
            if "epoch_seconds" in result and rec.get("scheduled_at"):
                rec.setdefault("startup_s", now - float(result["epoch_seconds"]) - rec["scheduled_at"])
            self.state.save()
        rec["epochs"] = int(result.get("epoch", result.get("training_iteration", 0)))
        rec["last_metric"] = result.get(self.metric)
        run_id = rec.get("run_id")
        ml = self.mlflow
        if ml is not None and run_id:
            metrics = {k: result[k] for k in EPOCH_METRICS if k in result}
            ml.logger(run_id).log_metrics(metrics, step=rec["epochs"])

    def _finish(self, trial, status: str, mlflow_status: str, reason: str = "") -> None:
        if self.trial_mode == "workers":
            from scalelab.tune.trials import release_placement_groups

            try:
                release_placement_groups(trial.local_path)
            except Exception as exc:  # noqa: BLE001 - worst case the next trial waits for CPUs
                log.warning("could not release trial %s's placement groups: %s", trial.trial_id, exc)
        rec = self.state.trial(trial.trial_id)
        epochs = int(rec.get("epochs") or 0)
        if status == "completed" and epochs < self.max_epochs:
            status = "stopped"  # ASHA stopped it early
        rec["status"] = status
        self.state.save()
        metric = rec.get("last_metric")
        shown = f"{self.metric} {metric:.4f}" if isinstance(metric, (int, float)) else "no result"
        colour = {"completed": "green", "stopped": "yellow"}.get(status, "red")
        self._print(
            f"[{colour}]{status:<9}[/] {trial.trial_id}  {shown}  after {epochs} epoch(s)"
            + (f"  ({reason})" if reason else "")
        )
        ml = self.mlflow
        run_id = rec.get("run_id")
        if ml is not None and run_id:
            tags = {"scalelab.trial_status": status, "scalelab.epochs_trained": str(epochs)}
            if rec.get("startup_s") is not None:
                tags["scalelab.startup_s"] = f"{rec['startup_s']:.3f}"
            if reason:
                tags["scalelab.error"] = reason[:5000]
            ml.logger(run_id).set_tags(tags)
            ml.end_run(run_id, mlflow_status, flush_s=5.0)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, "completed", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, "error", "FAILED", trial_error(trial))


def trial_error(trial) -> str:
    """The last line of a failed trial's traceback (the exception), or where to find it."""
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may not be synced yet
        error = None
    lines = [ln for ln in str(error or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else f"see {trial.error_file or 'the trial folder'}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
