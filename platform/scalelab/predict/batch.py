"""Batch prediction on Ray Data: an actor pool of model replicas over a source, into one Parquet file.

The driver resolves the model (registry version via ``tracking.bundles``, as Serve does, or a
local bundle) and the source, sizes the pool to the cluster (a GPU per replica when there are
GPUs; otherwise CPU replicas of a few threads each), runs ``map_batches`` and streams the results
into ``<out>`` through a temporary file that is renamed only when the run succeeded (an ``s3://``
destination is uploaded then). Rows: model name + version, ``file`` (or ``index`` for a dataset),
``label`` where known, the top-1 ``prediction`` and ``top_k_classes`` / ``top_k_scores``.
Unreadable images are counted and skipped (or, with ``on_bad_file="fail"``, stop the run with
their name); accuracy is reported whenever every image has a label among the model's classes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.artifacts.bundle import MODEL_META, WEIGHTS, read_bundle_meta
from scalelab.cluster.session import connect_ray
from scalelab.errors import ConfigError, DataError, ScalelabError
from scalelab.predict.replica import PredictReplica
from scalelab.predict.sources import S3Location, Source, parse_s3_url
from scalelab.tracking.bundles import connect, fetch_version_bundle, resolve_version, version_info
from scalelab.tracking.uri import resolve_tracking_uri

BAD_FILES_SHOWN = 10


@dataclass
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None
    bundle: Path | None = None  # a local bundle folder instead of the registry


@dataclass
class Plan:
    """How the actor pool is sized: replicas, torch threads and GPUs each, rows per batch."""

    replicas: int
    threads: int
    gpus_per_replica: int
    batch_size: int


@dataclass
class PredictSummary:
    model: str
    model_version: str | None
    source: str
    out: str
    images: int  # predicted
    bad: int  # skipped: unreadable or undecodable
    bad_files: list[dict[str, str]] = field(default_factory=list)  # {file, error}, all of them
    seconds: float = 0.0  # from starting the pool to the last row written
    images_per_s: float = 0.0
    startup_s: float = 0.0  # until the first rows came back (replicas starting, first batch)
    steady_images_per_s: float = 0.0  # after the first rows: the pool's pace once running
    accuracy: float | None = None  # when every predicted image has a label the model knows
    labelled: int = 0
    plan: dict[str, int] = field(default_factory=dict)
    data_version: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_model_ref(target: str) -> ModelRef:
    """``NAME`` (its @champion), ``NAME@alias``, ``NAME:version`` / ``NAME/version``, or a bundle folder."""
    path = Path(target)
    if (path / MODEL_META).is_file() and (path / WEIGHTS).is_file():
        return ModelRef(name=path.resolve().name, bundle=path.resolve())
    if "/" in target and path.is_dir():  # a path, not NAME/version
        raise ConfigError(f"{target} is a folder but not a model bundle (no {MODEL_META} + {WEIGHTS} in it)")
    if "@" in target:
        name, _, alias = target.partition("@")
        if name and alias:
            return ModelRef(name, alias=alias)
    else:
        sep = ":" if ":" in target else "/"
        name, _, version = target.partition(sep)
        if not version and name and sep not in target:
            return ModelRef(name, alias="champion")
        if name and version.isdigit():
            return ModelRef(name, version=version)
    raise ConfigError(
        f"bad model reference {target!r}: use NAME, NAME@alias, NAME:version or a bundle folder"
    )


def plan_pool(
    cluster: dict[str, float],
    replicas: int | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
) -> Plan:
    """Sizes for the cluster's resources (``ray.cluster_resources()``): one replica per GPU when
    there are GPUs; otherwise replicas of up to 4 torch threads (small images parallelise poorly
    inside one forward pass), as many as the CPUs hold. Asking for more than the cluster has is
    refused here: an actor pool that can never start would wait forever."""
    cpus, gpus = int(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    if gpus:
        replicas = replicas or gpus
        threads = threads or max(1, min(4, cpus // replicas))
        plan = Plan(replicas, threads, 1, batch_size or 1024)
    else:
        threads = threads or max(1, min(4, cpus))
        plan = Plan(replicas or max(1, cpus // threads), threads, 0, batch_size or 256)
    if plan.replicas * plan.threads > cpus:
        raise ConfigError(
            f"{plan.replicas} replicas x {plan.threads} threads need {plan.replicas * plan.threads} CPUs; "
            f"the Ray cluster has {cpus}. Lower --replicas or --threads"
        )
    if plan.replicas * plan.gpus_per_replica > gpus:
        raise ConfigError(f"{plan.replicas} GPU replicas; the Ray cluster has {gpus} GPUs. Lower --replicas")
    return plan


# ----------------------------------------------------------------------------- the model


def fetch_model(ref: ModelRef, tracking_uri: str | None, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its lineage (name, version, run id...), as Serve fetches it."""
    if ref.bundle is not None:
        meta = read_bundle_meta(ref.bundle)
        name = (meta.get("recipe") or {}).get("name") or ref.name
        return ref.bundle, {"name": name, "version": None, "weights_sha256": meta.get("weights_sha256")}
    client = connect(resolve_tracking_uri(tracking_uri))
    mv = resolve_version(client, ref.name, ref.version, None if ref.version else ref.alias)
    return fetch_version_bundle(client, mv, dest), version_info(mv)


def bundle_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (MODEL_META, WEIGHTS)}


# ----------------------------------------------------------------------------- the run


def ray_dataset(source: Source, blocks: int):
    """The source as a Ray dataset of rows {file, location, label} or {index, label, image}."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(source)
    labels = np.array([label or "" for label in source.labels] or [""] * n, dtype=object)
    if source.images is not None:
        columns = {"index": np.arange(n, dtype=np.int64), "label": labels, "image": source.images}
    else:
        columns = {
            "file": np.array(source.files, dtype=object),
            "location": np.array(source.locations, dtype=object),
            "label": labels,
        }
    step = -(-n // max(1, min(blocks, n)))  # several blocks, so every replica gets work
    tables = []
    for start in range(0, n, step):
        part = {k: v[start : start + step] for k, v in columns.items()}
        if "image" in part:
            part["image"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(part["image"]))
        tables.append(pa.table(part))
    return ray.data.from_arrow(tables)


def run_prediction(
    source: Source,
    bundle: Path,
    info: dict[str, Any],
    out: str,
    plan: Plan,
    top_k: int = 5,
    on_bad_file: str = "skip",
    max_pixels: int = 16_000_000,
    progress: Progress | None = None,
) -> PredictSummary:
    """Score every image of ``source`` with the bundle on an actor pool; write ``out`` (Parquet)."""
    import ray
    import ray.data

    if on_bad_file not in ("skip", "fail"):
        raise ConfigError(f"on_bad_file {on_bad_file!r}: use skip or fail")
    meta = read_bundle_meta(bundle)
    classes = list(meta["dataset"]["classes"])
    task = ((meta.get("recipe") or {}).get("model") or {}).get("task", "classification")
    if task != "classification":
        raise ConfigError(f"{info['name']} is a {task} model; batch prediction scores classifiers")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would print per operator
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Starting execution of ..." per run
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    # a block per batch: the progress bar moves batch by batch and every replica gets work
    blocks = max(plan.replicas, -(-len(source) // plan.batch_size))
    predictions = ray_dataset(source, blocks).map_batches(
        PredictReplica,
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.threads,
        num_gpus=plan.gpus_per_replica,
        fn_constructor_kwargs={
            # by reference: large constructor arguments would be copied into every actor's spec
            "bundle_files": ray.put(bundle_files(bundle)),
            "info": info,
            "top_k": top_k,
            "threads": plan.threads,
            "max_pixels": max_pixels,
            "s3": source.s3,
        },
    )
    writer = ParquetOutput(out, info, source, meta)
    progress = progress or Progress(len(source))
    bad: list[dict[str, str]] = []
    correct = labelled = done = first_rows = 0
    began = time.perf_counter()
    first_at = began
    try:
        for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
            ok = np.array([not e for e in batch["error"]], dtype=bool)
            names = batch["file"] if "file" in batch else batch["index"]
            for name, err in zip(names[~ok], batch["error"][~ok], strict=True):
                if on_bad_file == "fail":
                    raise DataError(
                        f"bad image in {source.where}: {err}. Fix or delete it, or run with "
                        f"--on-bad-file skip to skip and count unreadable images"
                    )
                bad.append({"file": str(name), "error": str(err)})
            rows = {k: v[ok] for k, v in batch.items() if k != "error"}
            label_index = np.array([_index_of(classes, lab) for lab in rows["label"]], dtype=np.int64)
            labelled += int((label_index >= 0).sum())
            correct += int((rows["top_index"][:, 0] == label_index)[label_index >= 0].sum())
            writer.write(rows, label_index, classes)
            if not done:
                first_at, first_rows = time.perf_counter(), len(ok)
            done += len(ok)
            progress.advance(len(ok))
        seconds = time.perf_counter() - began
        images = done - len(bad)
        if images == 0:
            raise DataError(
                f"no image of {source.where} could be read ({len(bad)} bad, e.g. "
                f"{bad[0]['file']}: {bad[0]['error']}); nothing written"
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.finish()
    return PredictSummary(
        model=str(info["name"]),
        model_version=info.get("version"),
        source=source.where,
        out=writer.shown,
        images=images,
        bad=len(bad),
        bad_files=bad,
        seconds=seconds,
        images_per_s=images / max(seconds, 1e-9),
        startup_s=first_at - began,
        steady_images_per_s=(done - first_rows) / max(began + seconds - first_at, 1e-9),
        accuracy=correct / labelled if labelled and labelled == images else None,
        labelled=labelled,
        plan=asdict(plan),
        data_version=source.data_version,
    )


def _index_of(classes: list[str], label: str) -> int:
    try:
        return classes.index(label) if label else -1
    except ValueError:
        return -1


class ParquetOutput:
    """Row groups appended as batches arrive, into a temporary file renamed (or uploaded) at the end."""

    def __init__(self, out: str, info: dict[str, Any], source: Source, meta: dict[str, Any]) -> None:
        self.out = out
        self.s3: S3Location | None = parse_s3_url(out) if out.startswith("s3://") else None
        self.shown = out if self.s3 else str(Path(out).resolve())
        final = Path(tempfile.gettempdir()) if self.s3 else Path(out).resolve().parent
        final.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".predictions-", suffix=".parquet.tmp", dir=final)
        os.close(fd)
        self.tmp = Path(tmp)
        self.model, self.version = str(info["name"]), info.get("version")
        self.by_index = source.kind == "dataset"
        self.metadata = {
            "scalelab.model": json.dumps({k: info.get(k) for k in ("name", "version", "run_id", "aliases")}),
            "scalelab.weights_sha256": str(meta.get("weights_sha256") or ""),
            "scalelab.source": source.where,
            "scalelab.data_version": json.dumps(source.data_version),
        }
        self.writer = None

    def write(self, rows: dict[str, np.ndarray], label_index: np.ndarray, classes: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(label_index)
        if n == 0:
            return
        names = np.array(classes, dtype=object)
        top = rows["top_index"]
        table = {
            "model": pa.array([self.model] * n, pa.string()),
            "model_version": pa.array([self.version] * n, pa.string()),
            **(
                {"index": pa.array(rows["index"], pa.int64())}
                if self.by_index
                else {"file": pa.array(rows["file"].tolist(), pa.string())}
            ),
            "label": pa.array([lab or None for lab in rows["label"]], pa.string()),
            "label_index": pa.array(label_index, pa.int64(), mask=label_index < 0),
            "prediction": pa.array(names[top[:, 0]].tolist(), pa.string()),
            "prediction_index": pa.array(top[:, 0], pa.int64()),
            "top_k_classes": pa.array(names[top].tolist(), pa.list_(pa.string())),
            "top_k_scores": pa.array(rows["top_score"].astype(np.float32).tolist(), pa.list_(pa.float32())),
        }
        table = pa.table(table)
        if self.writer is None:
            schema = table.schema.with_metadata(self.metadata)
            self.writer = pq.ParquetWriter(str(self.tmp), schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        self.writer.close()
        if self.s3 is None:
            os.replace(self.tmp, self.out)
            return
        key = self.s3.prefix.rstrip("/")
        try:
            self.s3.client().upload_file(str(self.tmp), self.s3.bucket, key)
        except Exception as exc:  # noqa: BLE001 - any upload failure, named with where it went
            raise DataError(
                f"cannot upload predictions to {self.out} ({type(exc).__name__}: {exc})"
            ) from None
        finally:
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


class Progress:
    """Images done of the total: a rich bar on a terminal, else a plain line every ``interval_s``."""

    def __init__(self, total: int, interval_s: float = 10.0, enabled: bool = True) -> None:
        self.total, self.done, self.interval_s = total, 0, interval_s
        self.began = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("predict"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("predict", total=total, rate="-")
        self.enabled = enabled

    def advance(self, images: int) -> None:
        self.done += images
        now = time.perf_counter()
        rate = f"{self.done / max(now - self.began, 1e-9):,.0f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=images, rate=rate)
        elif self.enabled and now - self.last >= self.interval_s:
            self.last = now
            print(f"predict {self.done:,}/{self.total:,} images  {rate} img/s", flush=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def predict(
    target: str,
    source: Source,
    out: str,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    replicas: int | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    top_k: int = 5,
    on_bad_file: str = "skip",
    max_pixels: int = 16_000_000,
    progress: bool = True,
) -> PredictSummary:
    """Resolve the model, connect to Ray (``--address``, the running stack, or a local Ray), run."""
    import ray

    ref = parse_model_ref(target)
    with tempfile.TemporaryDirectory(prefix="scalelab-predict-") as tmp:
        bundle, info = fetch_model(ref, tracking_uri, Path(tmp))
        started = connect_ray(address, log_to_driver=False, configure_logging=False)
        try:
            plan = plan_pool(ray.cluster_resources(), replicas, threads, batch_size)
            return run_prediction(
                source,
                bundle,
                info,
                out,
                plan,
                top_k,
                on_bad_file,
                max_pixels,
                Progress(len(source), enabled=progress),
            )
        except ScalelabError:
            raise
        except Exception as exc:  # a replica that failed to start (e.g. weights corrupt), Ray errors
            raise ScalelabError(f"batch prediction failed: {_root_message(exc)}") from exc
        finally:
            if started:
                ray.shutdown()


def _root_message(exc: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) exception, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[-1] if first else ''}"
