"""One MLflow run per training run, logged the same way in local mode and on Ray Train.

The driver opens the run (:func:`start_training_run`: params, tags, dataset input) and hands a
picklable :class:`RunTarget` to whoever trains; rank 0 logs per-epoch metrics through an
:class:`EpochLogger`; the driver logs the results (:func:`log_training_result`: plots, spec,
metrics.json, model bundle, final checkpoint, ``mlflow.pytorch.log_model``) and closes the run.
A run name maps to one MLflow run: rerunning a name (resume) continues the same MLflow run.
Every call goes through :class:`ResilientLogger`, so an unreachable server never stops training.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scalelab.cluster.session import STATE_DIR
from scalelab.config.settings import runtime_settings
from scalelab.errors import TrackingError
from scalelab.tracking.resilient import FlushReport, ResilientLogger, quick_requests
from scalelab.tracking.uri import resolve_tracking_uri

log = logging.getLogger("scalelab.tracking")

# per-epoch values that are identities rather than measurements
_NOT_METRICS = {"epoch", "params", "world_size"}


@dataclass(frozen=True)
class RunTarget:
    """Where to log (picklable: it travels to Ray Train workers)."""

    uri: str
    run_id: str
    experiment_id: str
    run_name: str
    flush_timeout_s: float = 60.0
    spill_dir: str | None = None  # unsent log calls are saved here as JSON

    def logger(self, role: str) -> ResilientLogger:
        from mlflow import MlflowClient

        spill = Path(self.spill_dir) / f"unsent-{self.run_id}-{role}.json" if self.spill_dir else None
        return ResilientLogger(MlflowClient(self.uri), self.run_id, spill_path=spill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block, then restore both the global and the env."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_global = getattr(tracking_utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = saved_global
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _retry(what: str, fn, uri: str):
    """Calls needed to *open* a run: retried briefly (``SCALELAB_MLFLOW_OPEN_*``), then a
    TrackingError the user can act on."""
    settings = runtime_settings()
    attempts, wait = settings.mlflow_open_attempts, settings.mlflow_open_wait_s
    for i in range(attempts):
        try:
            with quick_requests(settings.mlflow_open_timeout_s):
                return fn()
        except Exception as exc:  # noqa: BLE001
            if (
                getattr(exc, "error_code", None) in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
                or i == attempts - 1
            ):
                raise TrackingError(
                    f"could not {what} on the MLflow tracking server {uri}: "
                    f"{str(exc).splitlines()[0][:300]}. "
                    f"Start one with `scalelab up --mlflow`, point MLFLOW_TRACKING_URI / tracking.uri at a "
                    f"running server, or turn tracking off with tracking.enabled=false"
                ) from exc
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def start_training_run(
    spec: Any,
    run_name: str,
    data: Any | None = None,
    mode: str = "local",
    data_path: str | Path | None = None,
) -> RunTarget | None:
    """Open (or, for a run name seen before, reopen) the MLflow run; log params, tags, dataset."""
    if not spec.tracking.enabled:
        return None
    from mlflow import MlflowClient

    from scalelab.config.loader import flatten, recipe_to_dict
    from scalelab.tracking.lineage import run_tags

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = MlflowClient(uri)
    exp = _retry("read the experiment", lambda: client.get_experiment_by_name(spec.tracking.experiment), uri)
    exp_id = (
        exp.experiment_id
        if exp
        else _retry(
            "create the experiment",
            lambda: client.create_experiment(spec.tracking.experiment, artifact_location=_artifact_root(uri)),
            uri,
        )
    )
    found = _retry(
        "search runs",
        lambda: client.search_runs(
            [exp_id],
            filter_string=f"tags.`scalelab.run_name` = '{run_name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        ),
        uri,
    )
    version = getattr(data, "version", None)
    tags = run_tags(spec, run_name, version, mode)
    params = {
        k: v for k, v in flatten(recipe_to_dict(spec)).items() if not k.startswith(("search.", "serve."))
    }
    if found:
        run = found[0]
        tags["scalelab.resumed"] = str(int(run.data.tags.get("scalelab.resumed", "0")) + 1)
        _retry("reopen the run", lambda: client.update_run(run.info.run_id, status="RUNNING"), uri)
        params, changed = _new_params(params, run.data.params)
        if changed:
            tags["scalelab.changed_params"] = ",".join(sorted(changed))[:5000]
            log.warning("run %s resumed with changed params (kept as first logged): %s", run_name, changed)
        run_id = run.info.run_id
    else:
        run = _retry("create the run", lambda: client.create_run(exp_id, run_name=run_name, tags=tags), uri)
        run_id = run.info.run_id
    spill_dir = str((STATE_DIR / "unsent").resolve())
    target = RunTarget(uri, run_id, exp_id, run_name, spec.tracking.flush_timeout_s, spill_dir)
    logger = target.logger("driver")
    logger.set_tags(tags)
    logger.log_params(params)
    if data is not None:
        logger.call("dataset input", lambda: _log_dataset(client, run_id, data, data_path))
    logger.flush(spec.tracking.flush_timeout_s)
    return target


def _artifact_root(uri: str) -> str | None:
    """Embedded SQLite tracking keeps artifacts beside the database (not in ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides (its --artifacts-destination)
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()


def _new_params(params: dict[str, Any], logged: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    from scalelab.tracking.resilient import _param_value

    fresh = {k: v for k, v in params.items() if k not in logged}
    changed = [k for k, v in params.items() if k in logged and logged[k] != _param_value(v)]
    return fresh, changed


def _log_dataset(client: Any, run_id: str, data: Any, data_path: str | Path | None) -> None:
    """``log_input``: the prepared dataset by name, content digest and source (no data copied)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    version = getattr(data, "version", None)
    location = (version.remote if version and version.remote else None) or str(data_path or data.name)
    digest = version.content_hash if version else _folder_digest(data_path)
    source = HTTPDatasetSource(location if "://" in location else Path(location).resolve().as_uri())
    ds = MetaDataset(source, name=data.name, digest=(digest or "unknown")[:36])
    split_sizes = {k: len(v) for k, v in data.splits.items()}
    tags = [
        InputTag("mlflow.data.context", "training"),
        InputTag("scalelab.split_sizes", json.dumps(split_sizes)),
    ]
    client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])


def _folder_digest(path: str | Path | None) -> str | None:
    meta = Path(path) / "metadata.json" if path else None
    if meta is None or not meta.is_file():
        return None
    return hashlib.sha256(meta.read_bytes()).hexdigest()


class EpochLogger:
    """Rank 0's per-epoch metrics (train_loss, val_acc, lr, images_per_s, epoch_seconds, ...)."""

    def __init__(self, target: RunTarget, role: str = "rank0") -> None:
        self.target = target
        self.role = role
        self.logger: ResilientLogger | None = None  # made at the first epoch: mlflow's import
        # (~1-2 s) stays off the path to the first training step

    def __call__(self, metrics: dict[str, Any]) -> None:
        if self.logger is None:
            self.logger = self.target.logger(self.role)
        values = {k: v for k, v in metrics.items() if k not in _NOT_METRICS}
        self.logger.log_metrics(values, step=int(metrics["epoch"]))

    def close(self) -> FlushReport:
        if self.logger is None:
            return FlushReport(0, [])
        return self.logger.flush(self.target.flush_timeout_s)


def log_training_result(
    target: RunTarget,
    spec: Any,
    *,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    model_dir: str | Path,
    classes: list[str],
    model: Any | None = None,
    checkpoint_dir: str | Path | None = None,
    example: Any | None = None,
    figures: list[Path] | tuple[Path, ...] = (),
) -> FlushReport:
    """Final metrics, plots, spec, metrics.json, ``bundle/``, ``checkpoint/`` and the MLflow model.

    ``figures``: more images made by the caller (e.g. detection predictions), logged beside the plots.
    """
    from scalelab.config.loader import dump_recipe
    from scalelab.tracking.plots import plot_confusion_matrix, plot_training_curves

    logger = target.logger("driver")
    final = {  # per-epoch values (val_acc) are logged already; these summarise the run
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "val_acc"
    }
    logger.log_metrics(final, step=int(history[-1]["epoch"]) if history else 0)
    logger.set_tags(
        {"weights_sha256": _weights_sha(model_dir), "scalelab.precision": metrics.get("precision", "")}
    )
    with tempfile.TemporaryDirectory(prefix="scalelab-mlflow-") as tmp:
        out = Path(tmp)
        (out / "reports").mkdir()
        dump_recipe(spec, out / "reports" / "recipe.yaml")
        (out / "reports" / "metrics.json").write_text(
            json.dumps({**metrics, "history": history}, indent=2, default=float)
        )
        if history:
            plot_training_curves(history, out / "reports" / "training_curves.png")
        if metrics.get("confusion") is not None:
            plot_confusion_matrix(metrics["confusion"], classes, out / "reports" / "confusion_matrix.png")
        for fig in figures:
            shutil.copy(fig, out / "reports" / Path(fig).name)
        logger.log_artifacts(out / "reports")  # at the artifact root: recipe.yaml, metrics.json, PNGs
        logger.log_artifacts(model_dir, "bundle")
        if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
            logger.log_artifacts(checkpoint_dir, "checkpoint")
        if model is not None and spec.tracking.log_model:
            logger.call("mlflow model", lambda: log_pytorch_model(target, model, example))
        report = logger.flush(target.flush_timeout_s)  # before the temp folder goes away
    return report


def _weights_sha(model_dir: str | Path) -> str:
    meta = Path(model_dir) / "model.json"
    return json.loads(meta.read_text()).get("weights_sha256", "") if meta.is_file() else ""


def log_pytorch_model(target: RunTarget, model: Any, example: Any) -> Any:
    """``mlflow.pytorch.log_model`` (pt2 / torch.export) with a batch-of-2 example and a signature.

    A batch of one would freeze the batch dimension in the exported graph; two keeps it dynamic.
    pip requirements are given, not inferred (inference imports the model in a subprocess: ~5 s).
    """

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    # torch.export's pt2 packaging warns "No complete tensor found in the group!" for each weight
    # whose storage it cannot see whole: channels_last conv weights (what bf16 training uses) are
    # such. The exported graph runs in the default layout anyway, so export a contiguous copy
    # (same values, the training model untouched) and the warning has no cause left.
    net = (
        copy.deepcopy(getattr(model, "module", model))
        .float()
        .eval()
        .cpu()
        .to(memory_format=torch.contiguous_format)
    )
    x = np.asarray(example, dtype=np.float32)
    if x.shape[0] < 2:
        x = np.concatenate([x, x])
    with torch.no_grad():
        out = net(torch.from_numpy(x))
    # a detector returns (heatmap logits, box distances): named outputs in the signature
    y = out.numpy() if torch.is_tensor(out) else {f"output_{i}": o.numpy() for i, o in enumerate(out)}
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    # The fluent run makes the logged model belong to the run's experiment (runs:/ID/model resolves).
    with using_tracking_uri(target.uri):
        mlflow.start_run(run_id=target.run_id)
        try:
            return mlflow.pytorch.log_model(
                net, name="model", input_example=x, signature=infer_signature(x, y), pip_requirements=reqs
            )
        finally:
            with contextlib.suppress(Exception):  # the stack is popped even if the server is gone
                mlflow.end_run()


def tag_ray_job(target: RunTarget) -> None:
    """``ray.job_id`` (and ``ray.submission_id`` for a submitted job), once Ray is connected."""
    from scalelab.tracking.lineage import ray_job_ids

    tags = ray_job_ids()
    if tags:
        logger = target.logger("driver")
        logger.set_tags(tags)
        logger.flush(min(target.flush_timeout_s, runtime_settings().mlflow_end_flush_s))


def end_run(target: RunTarget, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    logger = ResilientLogger(MlflowClient(target.uri), target.run_id)
    logger.call(f"mark run {status}", lambda: MlflowClient(target.uri).set_terminated(target.run_id, status))
    logger.flush(min(target.flush_timeout_s, runtime_settings().mlflow_end_flush_s))


def download_bundle(run_id: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """Fetch the ``bundle/`` of a run (model.safetensors + model.json) into ``dest``; returns the folder."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with quick_requests(runtime_settings().mlflow_download_timeout_s):
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="bundle", dst_path=str(dest), tracking_uri=uri
            )
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(
            f"could not download bundle/ of run {run_id} from {uri}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    return Path(path)
