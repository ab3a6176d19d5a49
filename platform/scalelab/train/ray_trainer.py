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

from scalelab.config.console import quiet_third_party_logs
from scalelab.config.settings import runtime_settings
from scalelab.config.specs import RecipeSpec
from scalelab.data.dataset import DataVersion
from scalelab.errors import ConfigError, ScalelabError


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
    from scalelab.data.remote import s3_connection

    return path[len("s3://") :].rstrip("/"), pyarrow.fs.S3FileSystem(**s3_connection(endpoint))


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
    """The testing-only ``SCALELAB_FAULT_INJECT`` setting ("rank=R,epoch=E,marker=PATH[,step=S]"),
    parsed."""
    if not text:
        return None
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return {
        "rank": int(fields.get("rank", 1)),
        "epoch": int(fields.get("epoch", 1)),
        "marker": fields["marker"],
        "step": int(fields["step"]) if "step" in fields else None,
    }


def build_torch_trainer(
    spec: RecipeSpec,
    data_version: DataVersion | None = None,
    *,
    run_config: Any | None = None,
    run_name: str | None = None,
    tracking: Any | None = None,
    progress: bool = False,
    owns_job: bool = False,
):
    """A ``TorchTrainer`` running :func:`train_worker` on ``train.workers`` workers (at least 1).

    ``run_config`` replaces the one built from the recipe (Tune passes its own, with callbacks);
    ``tracking`` (a :class:`scalelab.tracking.RunTarget`) makes rank 0 log epochs to that MLflow run.
    ``owns_job``: the caller connected to Ray for this run and leaves after it (``scalelab train``), so Ray
    frees the run's placement group with the job (see :func:`lean_train_callbacks`).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from scalelab.train.loop import default_run_name

    t = spec.train
    settings = runtime_settings()
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
            logging_config=LoggingConfig(log_level=settings.ray_train_log_level),
        )
    single_node = tune_ray_train_startup()
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    if t.memory_per_worker_mb:
        resources["memory"] = t.memory_per_worker_mb * 1_000_000  # Ray counts memory in bytes
    config = {
        "spec": spec.model_dump(mode="json"),
        "data_path": str(resolve_data_path(spec, data_version)),
        "data_version": data_version.to_dict() if data_version else None,
        "tracking": tracking.to_dict() if tracking is not None else None,
        "fault": parse_fault(settings.fault_inject),
        "stream_source": stream_source_config(spec, data_version),
        "sample_log": settings.sample_log,
        "submitted_at": time.time(),
        "progress": progress,
    }
    try:
        from scalelab.train.ray_policy import cluster_can_autoscale

        fixed_cluster = not cluster_can_autoscale()
    except ImportError:  # a Ray Train without that policy class: Ray's own policy, as it is
        fixed_cluster = False
    trainer_class = lean_torch_trainer_class(
        drop_placement_group_cleaner=owns_job and single_node, fixed_cluster=fixed_cluster
    )
    return trainer_class(
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


# Ray Train V2's default callbacks that start an actor (a fresh Python process each) per run
DATASET_MANAGER_CALLBACK = "DatasetsCallback"  # a DatasetManager actor (imports Ray Data), datasets or not
PLACEMENT_GROUP_CLEANER_CALLBACK = "PlacementGroupCleanerCallback"  # a detached cleaner actor


def lean_train_callbacks(callbacks: list, *, has_datasets: bool, drop_placement_group_cleaner: bool) -> list:
    """Ray Train V2's default controller callbacks without those that only start processes here.

    Each dropped callback starts an actor, a Python process of its own importing Ray Train (and Ray
    Data) while the controller and the worker start: on a 2-core machine they took turns on the CPU
    with the very processes the first step waits for.

    - the datasets callback: we pass no ``datasets`` to the trainer (workers read the prepared data
      themselves), so its DatasetManager would serve nothing;
    - the placement-group cleaner (``drop_placement_group_cleaner``): a detached actor that removes
      the run's placement group should the controller die while its driver lives on. When the
      driver is a one-run command on a one-node cluster, Ray removes the group with the job anyway.
    """
    drop = set()
    if not has_datasets:
        drop.add(DATASET_MANAGER_CALLBACK)
    if drop_placement_group_cleaner:
        drop.add(PLACEMENT_GROUP_CLEANER_CALLBACK)
    return [cb for cb in callbacks if type(cb).__name__ not in drop]


_LEAN_TRAINERS: dict[tuple[bool, bool], type] = {}


def lean_torch_trainer_class(drop_placement_group_cleaner: bool, fixed_cluster: bool = False) -> type:
    """``TorchTrainer`` whose default callbacks pass through :func:`lean_train_callbacks` and, on a
    ``fixed_cluster`` (no autoscaler), whose scaling policy leaves out Ray's AutoscalingCoordinator
    (``train/ray_policy.py``); the plain ``TorchTrainer`` on a Ray Train without these hooks."""
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer
    key = (drop_placement_group_cleaner, fixed_cluster)
    if key not in _LEAN_TRAINERS:

        class LeanTorchTrainer(TorchTrainer):
            def _create_default_callbacks(self):
                return lean_train_callbacks(
                    super()._create_default_callbacks(),
                    has_datasets=bool(self.datasets),
                    drop_placement_group_cleaner=drop_placement_group_cleaner,
                )

            def _initialize_and_run_controller(self, **controller_init_kwargs):
                if fixed_cluster and "scaling_policy" in controller_init_kwargs:
                    from scalelab.train.ray_policy import without_autoscaling_coordinator

                    controller_init_kwargs["scaling_policy"] = without_autoscaling_coordinator(
                        controller_init_kwargs["scaling_policy"]
                    )
                return super()._initialize_and_run_controller(**controller_init_kwargs)

        _LEAN_TRAINERS[key] = LeanTorchTrainer
    return _LEAN_TRAINERS[key]


def stream_source_config(spec: RecipeSpec, data_version: DataVersion | None) -> dict[str, Any] | None:
    """Where workers stream shards from when they are not on this machine's disk: the DVC remote's
    objects of ``data_version`` (``data.stream_from: remote``); None: the prepared folder."""
    if spec.data.stream_from != "remote" or data_version is None:
        return None
    from scalelab.data.stream_source import remote_shards_config

    return remote_shards_config(data_version, spec.data.endpoint_url)


def _load_worker_data(config: dict[str, Any], spec: RecipeSpec):
    from scalelab.data.catalog import load_dataset
    from scalelab.data.shards import StreamDataset
    from scalelab.data.versioning import read_any

    path = Path(config["data_path"])
    if config.get("stream_source"):  # shards read where the driver resolved them (e.g. S3)
        from scalelab.data.stream_source import open_remote_shards

        data = open_remote_shards(config["stream_source"])
    elif (path / "metadata.json").is_file():
        # shards were verified on the driver; each worker reads only its plan's row groups
        data = read_any(path, verify=False) if _sharded(path) else read_any(path)
    else:  # another node may not have the driver's folder: prepare it there (seeded: same splits)
        data = load_dataset(spec.data)
    if isinstance(data, StreamDataset):
        data.reader = "ray"  # the train split's epoch plan runs as Ray Data tasks
    if config.get("data_version"):
        data.version = DataVersion(**config["data_version"])
    return data


def _sharded(path: Path) -> bool:
    from scalelab.data.shards import is_sharded

    return is_sharded(path)


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

    quiet_train_report_log()
    quiet_third_party_logs()
    from scalelab.train.loop import fit
    from scalelab.train.progress import FirstStepSignal, progress_for

    started = time.time()
    spec = RecipeSpec.model_validate(config["spec"])
    if spec.train.threads is None:  # never more torch threads than the CPUs Ray reserved for us
        spec.train.threads = max(1, int(spec.train.cpus_per_worker))
    rank = ray.train.get_context().get_world_rank()
    if config.get("sample_log"):  # testing only: the driver's setting, for this worker's loaders
        os.environ["SCALELAB_SAMPLE_LOG"] = config["sample_log"]
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

    report = _epoch_reporter(rank, timing, epoch_logger)
    if fault is not None and rank == fault["rank"]:
        report = _exit_after_epoch(report, rank, fault)

    with tempfile.TemporaryDirectory(prefix="scalelab-resume-") as tmp:
        resume_from = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_from = checkpoint.to_directory(tmp)  # a local copy, also when storage is S3
        timing["data_loaded"] = time.time()
        # progress within an epoch: rank 0 only (a worker's stdout is no terminal: plain lines)
        progress = FirstStepSignal(progress_for(rank) if config.get("progress") else None, timing)
        result = fit(spec, data, report=report, resume_from=resume_from, device=device, progress=progress)
    node_ids = _gather_node_ids()
    if epoch_logger is not None:
        epoch_logger.close()
    if rank != 0:
        return None
    return _rank0_result(spec, data, result, node_ids, timing)


def _epoch_reporter(rank: int, timing: dict[str, Any], epoch_logger: Any):
    """The ``report`` callback ``fit`` calls every epoch: one console line and the MLflow epoch
    metrics on rank 0, ``ray.train.report`` (metrics + checkpoint) on every rank."""
    import ray.train

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        epoch = int(metrics["epoch"])
        if metrics.get("mid_epoch"):  # train.checkpoint_every_steps: a checkpoint, no epoch line
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None,
                checkpoint_dir_name=f"checkpoint_{epoch:04d}_{int(metrics['step']):06d}",
            )
            return
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

    return report


def _rank0_result(spec: RecipeSpec, data: Any, result: Any, node_ids: list[str], timing: dict[str, Any]):
    """What rank 0 returns to the driver: metrics, history, the model bundle's files and timings."""
    import torch

    from scalelab.artifacts.bundle import save_model_bundle
    from scalelab.train.loop import bundle_meta, fit_metrics

    with tempfile.TemporaryDirectory(prefix="scalelab-bundle-") as tmp:
        save_model_bundle(result.model, tmp, bundle_meta(spec, data, result.runtime))
        bundle = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    metrics = {**fit_metrics(result), "worker_node_ids": node_ids}
    return {"metrics": metrics, "history": result.history, "bundle": bundle, "timing": timing}


def _exit_after_epoch(report, rank: int, fault: dict[str, Any]):
    """Testing only (``SCALELAB_FAULT_INJECT``): ``report`` that makes this worker process exit
    right after reporting ``fault["epoch"]``, once (the marker file records that it happened).
    Wrapped around the real one only when the setting names this rank: no check in the hot path."""

    def report_then_exit(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        report(metrics, checkpoint_dir)
        at_step = metrics.get("step") == fault["step"] if fault.get("step") else not metrics.get("mid_epoch")
        if int(metrics["epoch"]) == fault["epoch"] and at_step and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"rank {rank} exited after epoch {fault['epoch']}\n")
            _wait_until_reports_drained()
            os._exit(1)

    return report_then_exit


def _wait_until_reports_drained(timeout_s: float = 30.0) -> None:
    """Testing only: Ray Train V2 holds a worker's report in a one-slot queue that the controller
    drains every poll; a worker dying with its report still queued loses that report (and the
    checkpoint every rank reported with it), so a loaded machine used to resume from an earlier
    checkpoint than the test planned. Wait for the queue to empty, then one more poll."""
    import time

    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except Exception:  # another Ray Train version: a fixed grace period instead
        time.sleep(3.0)
        return
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")) * 2)


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


def tune_ray_train_startup() -> bool:
    """Two Ray Train V2 defaults that cost a lot on small runs (both overridable by setting them):

    - each worker's report queue holds one result and the controller drains it every health-check
      interval (2 s), so an epoch shorter than that waits for the poll: poll every 0.5 s instead;
    - a preemption-watcher actor (one more Python process) starts with every run; on a one-node
      cluster there is no node to lose without losing the run, so skip it there.

    The driver's values travel to the controller and workers (Ray Train propagates them).
    Returns whether the cluster has one node.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    single_node = ray.is_initialized() and len(ray.nodes()) == 1
    if single_node:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return single_node


def run_on_ray(
    spec: RecipeSpec,
    data,
    run_name: str,
    tracking: Any | None = None,
    progress: bool = False,
    owns_job: bool = False,
) -> dict[str, Any]:
    """Fit on Ray Train (connected by the caller); returns rank 0's result and a local copy of the
    latest checkpoint (``checkpoint_dir``, the caller removes it). ``owns_job``: the caller
    connected to Ray for this run and disconnects after it (see :func:`build_torch_trainer`)."""
    trainer = build_torch_trainer(
        spec, data.version, run_name=run_name, tracking=tracking, progress=progress, owns_job=owns_job
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        raise ScalelabError(explain_failure(exc, spec, run_name)) from exc
    out = dict(result.return_value or {})
    if not out:
        raise ScalelabError(f"Ray Train run {run_name!r} finished without a result from rank 0")
    if result.checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="scalelab-final-ckpt-"))
        out["checkpoint_dir"] = result.checkpoint.to_directory(str(local))
    out["storage"] = result.path
    return out


def explain_failure(exc: BaseException, spec: RecipeSpec, run_name: str) -> str:
    """What really happened when ``trainer.fit()`` raised ``exc``, as Ray Train V2 reports it.

    - ``WorkerGroupError``: ranks failed; each either *raised* an exception in the training code
      or *stopped* (process died, node lost). Ray Train restarts the worker group after either,
      up to ``train.max_failures`` times, so this is the last of ``max_failures + 1`` attempts.
    - ``ControllerError``: Ray Train's controller failed with an error it does not retry.
    - anything else: the run failed outside Ray Train's failure handling (never restarted).
    """
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    n = spec.train.max_failures
    resume = (
        f"Its checkpoints stay in {spec.train.storage_path}/{run_name}; rerun the same command "
        f"(or --resume {run_name}) to continue from the latest one"
    )
    attempts = (
        f"the last of {n + 1} attempts: Ray Train restarted the workers {n} time(s), train.max_failures={n}"
        if n
        else "no restart: train.max_failures=0"
    )
    if isinstance(exc, WorkerGroupError):
        raised, stopped = [], []
        for rank, err in sorted(exc.worker_failures.items()):
            # UserExceptionWithTraceback keeps what the training code raised in _base_exc
            base = getattr(err, "_base_exc", None)
            if base is not None:
                raised.append(f"rank {rank} raised {type(base).__name__}: {_first_line(base)}")
            else:
                stopped.append(f"rank {rank} stopped ({type(err).__name__}: {_first_line(err)})")
        if raised:
            return (
                f"Ray Train run {run_name!r} failed: the training code {'; '.join(raised + stopped)} "
                f"({attempts}). Fix the error and rerun; {resume[0].lower()}{resume[1:]}"
            )
        return f"Ray Train run {run_name!r} failed: worker {'; '.join(stopped)} ({attempts}). {resume}"
    if isinstance(exc, ControllerError):
        cause = exc.controller_failure
        return (
            f"Ray Train run {run_name!r} failed in Ray Train's controller, which does not retry this "
            f"error: {type(cause).__name__}: {_first_line(cause)}. {resume}"
        )
    return (
        f"Ray Train run {run_name!r} failed outside training (no worker restart was tried): "
        f"{type(exc).__name__}: {_first_line(exc)}. {resume}"
    )


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, ScalelabError):  # written for the user: all of it
        return str(exc)
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else "(no message)"
