"""``run_training``: one entry point for local and Ray Train runs; writes the bundle, tracks in MLflow."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.artifacts.bundle import load_model_bundle, read_bundle_meta, save_model_bundle
from scalelab.artifacts.preprocess import normalise_images
from scalelab.config.specs import RecipeSpec
from scalelab.data.catalog import load_dataset, prepared_path
from scalelab.data.samples import write_samples
from scalelab.errors import ConfigError
from scalelab.train.loop import (
    bundle_meta,
    check_data_fits_worker,
    check_model_fits_data,
    default_run_name,
    fit_metrics,
)


@dataclass
class TrainOutcome:
    run_name: str
    model_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    run_id: str | None = None  # the MLflow run, when tracking is enabled
    tracking_uri: str | None = None  # where that run is
    experiment_id: str | None = None


def example_batch(data, n: int = 2) -> np.ndarray:
    """``n`` normalised test images, float32 (n, C, H, W): the MLflow model's input example."""
    return normalise_images(data.splits["test"].x[:n], data.mean, data.std).numpy()


def run_training(
    spec: RecipeSpec, run_name: str | None = None, on_epoch=None, progress: bool = False
) -> TrainOutcome:
    """Train per the recipe: in-process when ``train.workers == 0``, else on Ray Train.

    ``progress``: rank 0 shows progress within each epoch (a bar on a terminal, plain lines else).

    A run name seen before resumes from its latest checkpoint (and continues its MLflow run).
    With tracking enabled, everything is logged to MLflow and ``run_id`` is returned.
    """
    from scalelab.tracking.runs import end_run, start_training_run, tag_ray_job

    name = run_name or default_run_name(spec)
    mode = "ray" if spec.train.workers > 0 else "local"
    if mode == "local" and spec.train.storage_path.startswith("s3://"):
        raise ConfigError(
            "train.storage_path on S3 needs Ray Train: set train.workers >= 1 (or use a folder)"
        )
    data = load_dataset(spec.data)
    check_model_fits_data(spec, data)  # before any run, checkpoint or Ray exists
    check_data_fits_worker(spec, data)
    started = time.perf_counter()
    timing = {"run_training": time.time()}  # where the time to the first step goes (benchmarks)
    started_ray = False
    # Opening the MLflow run (mlflow's import, the experiment, params, tags: seconds of Python)
    # runs in a thread. On Ray it starts at once, beside connecting to / starting Ray (this process
    # mostly waits on others then). In-process it starts when epoch 1's metrics need it: beside
    # the imports before the first step (torch, torch._dynamo at the optimiser's first use) the two
    # only took turns on the GIL, so the first step waited for both; beside training steps it was
    # worse than waiting (each of torch's many short GIL releases let the import thread in for up to
    # a switch interval: 30 digits steps overlapped with mlflow's import took ~1.5x as long as the
    # import and the steps one after the other, on this 2-core machine).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalelab-mlflow-open")
    opening = DeferredCall(pool, start_training_run, spec, name, data, mode, prepared_path(spec.data))
    if mode == "ray":
        opening.release()
    try:
        if mode == "ray":
            from scalelab.cluster.session import connect_ray

            started_ray = connect_ray(prestart_workers=False)  # Ray Train could not use them
            timing["ray_connected"] = time.time()
            target = opening.result()
            timing["tracking_opened"] = time.time()
            if target is not None:
                tag_ray_job(target)
        try:
            if mode == "ray":
                # started_ray: this call connected and disconnects after the run (the job ends with it)
                outcome = _train_on_ray(spec, data, name, target, started, timing, progress, started_ray)
            else:
                outcome = _train_local(spec, data, name, opening, started, timing, on_epoch, progress)
                target = opening.result()
        except BaseException as exc:
            target = _opened_or_none(opening)
            if target is not None:
                end_run(target, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if target is not None:
            end_run(target, "FINISHED")
        return outcome
    finally:
        opening.release()  # training failed before its first step: the run still opens (and ends)
        pool.shutdown(wait=True)  # an open still under way (training failed early) finishes first
        if started_ray:
            import ray

            ray.shutdown()


class DeferredCall:
    """``fn(*args)`` in ``pool``, started by :meth:`release` or by the first :meth:`result` (which
    never waits on a call nobody started)."""

    def __init__(self, pool: ThreadPoolExecutor, fn, *args: Any) -> None:
        self._go = threading.Event()
        self._future: Future = pool.submit(self._run, fn, args)

    def _run(self, fn, args: tuple) -> Any:
        self._go.wait()
        return fn(*args)

    def release(self) -> None:
        self._go.set()

    def result(self) -> Any:
        self._go.set()
        return self._future.result()


def _opened_or_none(opening: DeferredCall):
    """The run ``opening`` opened, once it has; None when opening it failed (that error is the
    one the caller sees, or training failed first and its error is)."""
    try:
        return opening.result()
    except Exception:  # noqa: BLE001 - reported by whoever waited on it first
        return None


def _train_local(
    spec, data, name, opening: DeferredCall, started, timing, on_epoch, progress=False
) -> TrainOutcome:
    from scalelab.tracking.runs import EpochLogger
    from scalelab.train.local import CheckpointKeeper, run_local
    from scalelab.train.progress import FirstStepSignal, progress_for

    run_dir = Path(spec.train.storage_path) / name
    epoch_logger: EpochLogger | None = None

    def each_epoch(metrics: dict[str, Any]) -> None:
        nonlocal epoch_logger
        timing.setdefault("first_epoch_reported", time.time())  # as Ray Train's workers record it
        timing.setdefault("first_epoch_seconds", float(metrics["epoch_seconds"]))
        if "tracking_opened" not in timing:  # the first epoch's metrics need the run: open it now
            target = opening.result()
            timing["tracking_opened"] = time.time()
            epoch_logger = EpochLogger(target, role="local") if target is not None else None
        if epoch_logger is not None:
            epoch_logger(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    steps = FirstStepSignal(progress_for(0) if progress else None, timing)  # timing["first_step"]
    result = run_local(spec, data, run_dir, on_epoch=each_epoch, progress=steps)
    if epoch_logger is not None:
        epoch_logger.close()
    metrics = {**fit_metrics(result), "wall_seconds": time.perf_counter() - started, "timing": timing}
    out = Path(spec.train.output_dir) / name
    model_dir = save_model_bundle(result.model, out / "model", bundle_meta(spec, data, result.runtime))
    return _finish(
        spec,
        data,
        name,
        opening.result(),  # already open, unless the run had no epoch left to train
        out,
        model_dir,
        metrics,
        result.history,
        result.model,
        CheckpointKeeper(run_dir, spec.train.num_to_keep).latest(),
    )


def _train_on_ray(spec, data, name, target, started, timing, progress=False, owns_job=False) -> TrainOutcome:
    from scalelab.train.ray_trainer import run_on_ray

    res = run_on_ray(spec, data, name, tracking=target, progress=progress, owns_job=owns_job)
    metrics = {
        **res["metrics"],
        "wall_seconds": time.perf_counter() - started,
        "timing": {**timing, **res.get("timing", {}), "fit_returned": time.time()},
    }
    out = Path(spec.train.output_dir) / name
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    for fname, blob in res["bundle"].items():
        (model_dir / fname).write_bytes(blob)
    model, _ = load_model_bundle(model_dir)
    ckpt = res.get("checkpoint_dir")
    try:
        return _finish(spec, data, name, target, out, model_dir, metrics, res["history"], model, ckpt)
    finally:
        if ckpt:
            shutil.rmtree(ckpt, ignore_errors=True)


def _finish(
    spec, data, name, target, out, model_dir, metrics, history, model, checkpoint_dir
) -> TrainOutcome:
    from scalelab.tracking.runs import log_training_result

    (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2, default=float))
    if spec.model.task == "classification":  # one-click examples for the demo page, in the bundle
        write_samples(data.splits["test"], data.classes, model_dir)
    figures = []
    if spec.model.task == "detection":  # test images with predicted (red) and true (green) boxes
        from scalelab.train.detection import write_prediction_images

        figures = write_prediction_images(model, data.splits["test"], read_bundle_meta(model_dir), out)
    if target is not None:
        log_training_result(
            target,
            spec,
            metrics=metrics,
            history=history,
            model_dir=model_dir,
            classes=data.classes,
            model=model,
            checkpoint_dir=checkpoint_dir,
            example=example_batch(data),
            figures=figures,
        )
    return TrainOutcome(
        name,
        model_dir,
        metrics,
        history,
        target.run_id if target else None,
        target.uri if target else None,
        target.experiment_id if target else None,
    )
