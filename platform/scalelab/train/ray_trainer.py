"""Ray Train assembly: the same ``fit`` on N workers, checkpoints in ``storage_path``, resumable.

Ray stays at the edges: :func:`train_worker` only loads the prepared data, restores the latest
checkpoint Ray hands it, and binds ``fit``'s ``report`` callable to ``ray.train.report`` (plus
rank 0's MLflow epoch logging). Everything Ray-specific about resources, storage and failures is
decided on the driver by :func:`build_torch_trainer` from the recipe.

Global batch rule: ``train.batch_size`` is the global batch. With N workers and A accumulation
steps each worker takes ``batch_size // (N x A)`` images per micro-step, so one optimiser step
sees the same number of images (and the same learning rate applies) whatever N is.

Resume: a run is identified by ``(storage_path, run name)``. Running the same command again with
the same name (``train.run_name`` or ``--resume NAME``) makes Ray find the run's checkpoint
snapshot and every worker starts from the latest registered checkpoint. Ray may miss a checkpoint
reported just before a crash, so the guarantee is: no more than ``checkpoint_every`` epochs lost.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scalelab.config.specs import RecipeSpec
from scalelab.data.dataset import DataVersion
from scalelab.errors import ConfigError

# Test-only fault injection: "rank=1,epoch=2,marker=/tmp/x" makes that rank os._exit(1) right after
# reporting that epoch, once (the marker file records that it happened).
FAULT_ENV = "SCALELAB_FAULT_INJECT"


def storage_location(spec: RecipeSpec) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: an absolute folder, or S3 via pyarrow.

    ``s3://bucket/prefix`` on an S3-compatible endpoint gets a ``pyarrow.fs.S3FileSystem`` with
    ``endpoint_override`` (from ``train.storage_endpoint`` or ``$AWS_ENDPOINT_URL[_S3]``) and the
    credentials of the driver's environment; the filesystem object travels to the workers, so they
    need no AWS variables of their own. A URI that already carries ``?endpoint_override=`` is kept.
    """
    path = spec.train.storage_path
    if not path.startswith("s3://"):
        if "://" in path:
            raise ConfigError(f"train.storage_path {path!r}: use a folder or s3://bucket/prefix")
        return str(Path(path).resolve()), None
    if "?" in path:
        return path, None
    import pyarrow.fs

    endpoint = (
        spec.train.storage_endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]
        )
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return path[len("s3://") :].rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


def resolve_data_path(spec: RecipeSpec, data_version: DataVersion | None = None) -> Path:
    """Absolute path of the prepared dataset the workers read (Ray workers run in another cwd)."""
    from scalelab.data.catalog import load_dataset, prepared_path

    candidates = []
    if data_version is not None and data_version.path:
        repo = getattr(data_version, "repo", None)
        if repo and "://" not in repo:
            candidates.append(Path(repo) / data_version.path)
        candidates.append(Path(data_version.path))
    candidates.append(prepared_path(spec.data))
    for c in candidates:
        if (c / "metadata.json").is_file():
            return c.resolve()
    load_dataset(spec.data)  # prepares it
    return prepared_path(spec.data).resolve()


def parse_fault(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return {
        "rank": int(fields.get("rank", 1)),
        "epoch": int(fields.get("epoch", 1)),
        "marker": fields["marker"],
    }


def build_torch_trainer(
    spec: RecipeSpec,
    data_version: DataVersion | None = None,
    *,
    run_config: Any | None = None,
    run_name: str | None = None,
    tracking: Any | None = None,
    progress: bool = False,
):
    """A ``TorchTrainer`` running :func:`train_worker` on ``train.workers`` workers (at least 1).

    ``run_config`` replaces the one built from the recipe (Tune passes its own, with callbacks);
    ``tracking`` (a :class:`scalelab.tracking.RunTarget`) makes rank 0 log epochs to that MLflow run.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from scalelab.train.api import default_run_name

    t = spec.train
    name = run_name or default_run_name(spec)
    if run_config is None:
        storage_path, filesystem = storage_location(spec)
        run_config = RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.num_to_keep, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level=os.environ.get("SCALELAB_RAY_TRAIN_LOG_LEVEL", "WARNING")),
        )
    tune_ray_train_startup()
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    config = {
        "spec": spec.model_dump(mode="json"),
        "data_path": str(resolve_data_path(spec, data_version)),
        "data_version": data_version.to_dict() if data_version else None,
        "tracking": tracking.to_dict() if tracking is not None else None,
        "fault": parse_fault(os.environ.get(FAULT_ENV)),
        "submitted_at": time.time(),
        "progress": progress,
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=max(1, t.workers),
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement_strategy,
        ),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def _load_worker_data(config: dict[str, Any], spec: RecipeSpec):
    from scalelab.data.catalog import load_dataset
    from scalelab.data.dataset import read_prepared

    path = Path(config["data_path"])
    # Another node may not have the driver's folder: prepare it there (seeded, so identical splits).
    data = read_prepared(path) if (path / "metadata.json").is_file() else load_dataset(spec.data)
    if config.get("data_version"):
        data.version = DataVersion(**config["data_version"])
    return data


def quiet_train_report_log() -> None:
    """Ray Train V2 logs ``Reporting training result N: TrainingReport(...)`` at INFO for every
    report, on a logger named by its file path (outside ``ray.train``, so ``LoggingConfig`` does not
    reach it) and it lands in the job's console between our epoch lines. Raise that one logger."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Body of every Ray Train worker: ``fit`` with Ray's checkpoint in and ``ray.train.report`` out."""
    import ray.train
    import torch

    quiet_train_report_log()
    from scalelab.train.loop import fit
    from scalelab.train.progress import progress_for

    started = time.time()
    spec = RecipeSpec.model_validate(config["spec"])
    if spec.train.threads is None:  # never more torch threads than the CPUs Ray reserved for us
        spec.train.threads = max(1, int(spec.train.cpus_per_worker))
    rank = ray.train.get_context().get_world_rank()
    data = _load_worker_data(config, spec)
    device = None
    if spec.train.use_gpu:
        from ray.train.torch import get_device

        device = get_device()

    epoch_logger = None
    if rank == 0 and config.get("tracking"):
        from scalelab.tracking.runs import EpochLogger, RunTarget

        epoch_logger = EpochLogger(RunTarget(**config["tracking"]), role="rank0")
    fault = config.get("fault")
    timing: dict[str, Any] = {"submitted": config["submitted_at"], "worker_started": started, "reports": []}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        epoch = int(metrics["epoch"])
        timing["reports"].append(time.time())
        timing.setdefault("first_epoch_reported", time.time())
        timing.setdefault("first_epoch_seconds", float(metrics["epoch_seconds"]))
        if rank == 0:
            # Not print(): Ray Train patches it to log through the root logger *and* (stdout being
            # wrapped in a Ray worker) to print as well, so each line reached the console twice.
            sys.stdout.write(
                f"epoch {epoch:>3}  loss {metrics['train_loss']:.4f}  val_acc {metrics['val_acc']:.4f}  "
                f"lr {metrics['lr']:.4g}  {metrics['images_per_s']:,.0f} img/s  "
                f"{metrics['epoch_seconds']:.2f}s\n"
            )
            sys.stdout.flush()
            if epoch_logger is not None:
                epoch_logger(metrics)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_{epoch:04d}" if checkpoint else None,
        )
        if (
            fault
            and rank == fault["rank"]
            and epoch == fault["epoch"]
            and not os.path.exists(fault["marker"])
        ):
            Path(fault["marker"]).write_text(f"rank {rank} exited after epoch {epoch}\n")
            os._exit(1)

    with tempfile.TemporaryDirectory(prefix="scalelab-resume-") as tmp:
        resume_from = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_from = checkpoint.to_directory(tmp)  # a local copy, also when storage is S3
        timing["data_loaded"] = time.time()
        # progress within an epoch: rank 0 only (a worker's stdout is no terminal: plain lines)
        progress = progress_for(rank) if config.get("progress") else None
        result = fit(spec, data, report=report, resume_from=resume_from, device=device, progress=progress)
    node_ids = _gather_node_ids()
    if epoch_logger is not None:
        epoch_logger.close()
    if rank != 0:
        return None
    from scalelab.train.api import fit_metrics
    from scalelab.train.checkpoint import save_model_bundle
    from scalelab.train.loop import bundle_meta

    with tempfile.TemporaryDirectory(prefix="scalelab-bundle-") as tmp:
        save_model_bundle(result.model, tmp, bundle_meta(spec, data, result.runtime))
        bundle = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    metrics = {**fit_metrics(result), "worker_node_ids": node_ids}
    return {"metrics": metrics, "history": result.history, "bundle": bundle, "timing": timing}


def _gather_node_ids() -> list[str]:
    """The Ray node id of every rank (rank order): where the workers actually ran."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def connect_ray(num_cpus: int | None = None) -> bool:
    """Use the Ray this process is connected to, else ``$RAY_ADDRESS`` / the `scalelab up` stack's
    head, else start a local one. Returns True when this call started or connected Ray."""
    import ray

    if ray.is_initialized():
        return False
    from scalelab.cluster.stack import live_ray_address

    auth_before = os.environ.get("RAY_AUTH_MODE")
    address = os.environ.get("RAY_ADDRESS") or live_ray_address()  # may set RAY_AUTH_MODE
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        if os.environ.get("RAY_AUTH_MODE") != auth_before:
            _reload_ray_config()
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new instance, never whatever head someone else started on this machine; its
        # Serve logs (one access line per request) go to files, not to this console
        from scalelab.cluster.stack import quiet_serve_env

        os.environ.update(quiet_serve_env())
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def _reload_ray_config() -> None:
    """Ray caches RAY_AUTH_MODE when it is imported; re-read it (as Ray's own token setup does)."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray version: the env var alone must do
        pass


def tune_ray_train_startup() -> None:
    """Two Ray Train V2 defaults that cost a lot on small runs (both overridable by setting them):

    - each worker's report queue holds one result and the controller drains it every health-check
      interval (2 s), so an epoch shorter than that waits for the poll: poll every 0.5 s instead;
    - a preemption-watcher actor (one more Python process) starts with every run; on a one-node
      cluster there is no node to lose without losing the run, so skip it there.

    The driver's values travel to the controller and workers (Ray Train propagates them).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized() and len(ray.nodes()) == 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def run_on_ray(
    spec: RecipeSpec, data, run_name: str, tracking: Any | None = None, progress: bool = False
) -> dict[str, Any]:
    """Fit on Ray Train (connected by the caller); returns rank 0's result and a local copy of the
    latest checkpoint (``checkpoint_dir``, the caller removes it)."""
    from scalelab.errors import ScalelabError

    trainer = build_torch_trainer(spec, data.version, run_name=run_name, tracking=tracking, progress=progress)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise ScalelabError(
            f"Ray Train run {run_name!r} failed after {spec.train.max_failures} restart(s): {exc}. "
            f"Its checkpoints stay in {spec.train.storage_path}/{run_name}; rerun the same command "
            f"(or --resume {run_name}) to continue from the latest one"
        ) from exc
    out = dict(result.return_value or {})
    if not out:
        raise ScalelabError(f"Ray Train run {run_name!r} finished without a result from rank 0")
    if result.checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="scalelab-final-ckpt-"))
        out["checkpoint_dir"] = result.checkpoint.to_directory(str(local))
    out["storage"] = result.path
    return out
