"""The per-worker training loop: plain functions of (spec, dataset, model), no Ray inside.

``fit`` runs in-process (local mode) or inside a Ray Train worker unchanged: when a torch
process group is initialised it wraps the model in DDP and shards data by rank. It reports
through one callable, ``report(metrics, checkpoint_dir_or_None)``, which the caller binds to the
console, to MLflow or to ``ray.train.report``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelab.artifacts.evaluate import EvalResult, evaluate_model
from scalelab.artifacts.hardware import Runtime
from scalelab.config.specs import RecipeSpec
from scalelab.data.catalog import memory_budget_mb
from scalelab.data.dataset import Dataset
from scalelab.data.loader import TensorLoader, allowed_augment
from scalelab.data.shards import StreamDataset
from scalelab.errors import ConfigError
from scalelab.models.detection_loss import detection_loss
from scalelab.models.factory import build_model, count_params
from scalelab.models.fold import folded_copy
from scalelab.models.resnet import classification_loss
from scalelab.train.checkpoint import read_position, restore_training_checkpoint, save_training_checkpoint
from scalelab.train.detection import DetectionLoader, detection_augment
from scalelab.train.progress import EpochProgress
from scalelab.train.runtime import RssWatch, seed_everything, select_runtime, set_threads

Report = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    test: EvalResult
    val: EvalResult
    runtime: Runtime
    params: int
    start_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def default_run_name(spec: RecipeSpec) -> str:
    return spec.train.run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit_metrics(result: FitResult) -> dict[str, Any]:
    """What a finished fit is summarised by (the same in local mode and on Ray)."""
    return {
        **result.test.as_metrics("test"),  # detection: test_map50, test_map, test_map_small, ...
        "test_acc": result.test.accuracy,
        "test_loss": result.test.loss,
        "val_acc": result.val.accuracy,
        "params": result.params,
        "precision": result.runtime.precision,
        "resumed_from_epoch": result.start_epoch,
        "per_class_test_acc": result.test.per_class_accuracy,
        "confusion": result.test.confusion.tolist() or None,  # None for detection
    }


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_worker_batch(global_batch: int, world_size: int, accum: int) -> int:
    """The global batch is fixed by the recipe: each worker takes its share of each micro-step."""
    share = global_batch // (world_size * accum)
    if share < 1:
        raise ValueError(
            f"train.batch_size={global_batch} is too small for {world_size} workers x "
            f"{accum} accumulation steps; raise the batch size or lower workers/grad_accum_steps"
        )
    return share


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak LR at an optimiser step."""
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":  # 30% linear ramp from 1/25, then cosine to ~0
        ramp = max(1, int(0.3 * total))
        if step < ramp:
            return 0.04 + 0.96 * step / ramp
        t = (step - ramp) / max(1, total - ramp)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(spec: RecipeSpec, model: nn.Module) -> torch.optim.Optimizer:
    t = spec.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a Python loop over every parameter tensor: on CPU the
    # default SGD step of msresnet_s-sized models (58 tensors) took 2.3 ms of a ~40 ms digits step,
    # fused 0.37 ms (torch 2.13, 1 thread). Same update rule and state dict, so checkpoints load
    # either way. Only where torch has the fused kernel (CPU, CUDA).
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else {}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, **fused)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0, **fused)


def check_model_fits_data(spec: RecipeSpec, data: Dataset) -> None:
    """Refuse, before anything starts, a model option the dataset cannot support."""
    if spec.model.test_time_flip and not data.hflip_ok:
        raise ConfigError(
            f"model.test_time_flip averages each image with its mirror image, but '{data.name}' images "
            "are not left-right symmetric (its metadata says hflip_ok: false, e.g. digits): set "
            "model.test_time_flip=false"
        )


def check_data_fits_worker(spec: RecipeSpec, data: Dataset) -> None:
    """Refuse an in-memory dataset larger than one training worker's memory budget: every worker
    (and the in-process run) holds all its splits whole. Streamed datasets hold a few windows."""
    if isinstance(data, StreamDataset):
        return
    decoded = sum(s.x.nbytes for s in data.splits.values()) / 1e6
    budget, source = memory_budget_mb(spec.data, worker_memory_mb(spec))
    if decoded > budget:
        raise ConfigError(
            f"dataset {data.name!r} is prepared in the memory format and decodes to {decoded:,.1f} MB "
            f"(train + val + test), more than one training worker's memory budget of {budget:,.0f} MB "
            f"({source}): every worker would hold all of it. Set data.format=stream and run `scalelab "
            f"data prepare <recipe>` again to stream Parquet shards instead, or raise the budget"
        )


def worker_memory_mb(spec: RecipeSpec) -> float | None:
    """The memory Ray reserves per training worker (``train.memory_per_worker_mb``), if any."""
    t = spec.train
    return float(t.memory_per_worker_mb) if t.memory_per_worker_mb and t.workers > 0 else None


def bundle_meta(spec: RecipeSpec, data: Dataset, runtime: Runtime | None = None) -> dict[str, Any]:
    return {
        "recipe": spec.model_dump(mode="json"),
        "dataset": data.metadata(),
        "data_version": data.version.to_dict() if data.version else None,
        "data_status": data.version.status if data.version else "unversioned",
        "precision": runtime.precision if runtime else None,
    }


def fit(
    spec: RecipeSpec,
    data: Dataset,
    report: Report | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: EpochProgress | None = None,
) -> FitResult:
    """Train ``spec`` on ``data``; returns the model, per-epoch history and test evaluation.

    ``progress`` (rank 0's, see :mod:`scalelab.train.progress`) hears of every step of an epoch.
    """
    t = spec.train
    rank, world_size = world()
    set_threads(t.threads)
    seed_everything(t.seed + rank)
    runtime = select_runtime(t, device)
    if runtime.device.type == "cuda" and world_size > 1:
        torch.cuda.set_device(runtime.device)

    check_model_fits_data(spec, data)
    check_data_fits_worker(spec, data)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(spec.model, data.channels, data.num_classes, data.image_size).to(runtime.device)
    params = count_params(model)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(spec, model)
    loaders = build_loaders(spec, data, runtime, rank, world_size)
    scheduler = build_lr_scheduler(spec, optimizer, len(loaders.train))

    start_epoch, history, position = 0, [], None
    if resume_from is not None:
        start_epoch, history = restore_training_checkpoint(resume_from, model, optimizer, scheduler)
        position = usable_position(read_position(resume_from), world_size)
    seed_everything(t.seed + rank + 1000 * start_epoch)  # resumed runs continue a fresh stream

    train_model: nn.Module = model
    if world_size > 1:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def step_checkpoint(epoch: int, steps: int, consumed: int, running: dict[str, float]) -> None:
        """A mid-epoch checkpoint (``train.checkpoint_every_steps``) with this rank's position."""
        metrics = {
            **running,
            "epoch": epoch,  # epochs completed; the position says how far into the next one
            "step": steps,
            "mid_epoch": 1,
            "val_acc": history[-1].get("val_acc", 0.0) if history else 0.0,
            "world_size": world_size,
        }
        where = {"epoch": epoch, "consumed": consumed, "world_size": world_size}
        with tempfile.TemporaryDirectory(prefix="scalelab-ckpt-") as tmp:
            if rank == 0:
                meta = bundle_meta(spec, data, runtime)
                save_training_checkpoint(
                    tmp, model, optimizer, scheduler, epoch, history, meta, position=where
                )
            report(metrics, tmp if rank == 0 else None)

    on_step = step_checkpoint if report is not None and t.checkpoint_every_steps else None
    val = None
    try:
        read_ahead(loaders.train, start_epoch, position, t.epochs)  # start-up overlaps what follows
        for epoch in range(start_epoch, t.epochs):
            skip = resume_skip(position, epoch)
            metrics = train_one_epoch(
                spec,
                train_model,
                loaders.train,
                optimizer,
                scheduler,
                runtime,
                epoch,
                progress,
                skip,
                on_step,
            )
            read_ahead(loaders.train, epoch + 1, position, t.epochs)  # runs while val is evaluated
            val = evaluate_model(model, loaders.val, data.num_classes, runtime)
            metrics.update(val.as_metrics("val"))
            metrics.update(epoch=epoch + 1, params=params, world_size=world_size, resumed_from=start_epoch)
            if skip:
                metrics["resumed_at_sample"] = skip
            history.append(metrics)
            if report is not None:
                checkpoint = (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs
                state = (
                    (model, optimizer, scheduler, history, bundle_meta(spec, data, runtime))
                    if checkpoint
                    else None
                )
                report_epoch(report, metrics, state, rank)
            if should_stop is not None and should_stop():
                break
    finally:
        if hasattr(loaders.train, "close"):  # a reader started ahead for an epoch that never ran
            loaders.train.close()

    if val is None:  # resumed after the last epoch: nothing left to train
        val = evaluate_model(model, loaders.val, data.num_classes, runtime)
    # scored as every prediction path runs the model (BatchNorm folded, models/fold.py), so this
    # test accuracy is what `scalelab evaluate`, the promotion gate and the served model reproduce
    test = evaluate_model(folded_copy(model), loaders.test, data.num_classes, runtime)
    return FitResult(model, history, test, val, runtime, params, start_epoch)


def resume_skip(position: dict[str, Any] | None, epoch: int) -> int:
    """Samples of ``epoch`` this rank consumed before a resume (0: the epoch starts afresh)."""
    return position["consumed"] if position is not None and position["epoch"] == epoch else 0


def read_ahead(loader: Any, epoch: int, position: dict[str, Any] | None, epochs: int) -> None:
    """Start ``epoch``'s train reader now when the loader can (streamed shards: ``prefetch``), so
    its start-up runs during the work before that epoch (the previous epoch's evaluation)."""
    if epoch < epochs and hasattr(loader, "prefetch"):
        loader.prefetch(epoch, resume_skip(position, epoch))


def usable_position(position: dict[str, Any] | None, world_size: int) -> dict[str, Any] | None:
    """A mid-epoch position applies only to the world size that wrote it (the epoch plan is cut
    into one part per rank); another world size restarts that epoch from its beginning."""
    if position is None or position.get("world_size") == world_size:
        return position
    import logging

    logging.getLogger(__name__).warning(
        "checkpoint was taken mid-epoch with %s workers, this run has %s: epoch %s restarts from its "
        "beginning",
        position.get("world_size"),
        world_size,
        position["epoch"] + 1,
    )
    return None


@dataclass
class Loaders:
    train: Any  # TensorLoader, DetectionLoader, or a streaming loader (scalelab.data.stream)
    val: Any
    test: Any


def build_loaders(spec: RecipeSpec, data: Dataset, runtime: Runtime, rank: int, world_size: int) -> Loaders:
    """Train (this rank's shard, augmented, shuffled), val and test loaders."""
    t = spec.train
    micro = per_worker_batch(t.batch_size, world_size, t.grad_accum_steps)
    if isinstance(data, StreamDataset):
        return Loaders(*stream_loaders(spec, data, runtime, rank, world_size, micro))
    detection = spec.model.task == "detection"  # boxes in, mAP out; the rest of the loop is shared
    Loader = DetectionLoader if detection else TensorLoader  # noqa: N806
    loader_args = dict(
        mean=data.mean, std=data.std, device=runtime.device, channels_last=runtime.channels_last
    )
    augment = allowed_augment(spec.data.augment, data.hflip_ok)  # never flip digits
    train = Loader(
        data.splits["train"],
        micro,
        shuffle=True,
        augment=augment,
        seed=t.seed,
        rank=rank,
        world_size=world_size,
        drop_last=True,
        **loader_args,
    )
    return Loaders(
        train,
        Loader(data.splits["val"], 256, rank=rank, world_size=world_size, **loader_args),
        Loader(data.splits["test"], 256, rank=rank, world_size=world_size, **loader_args),
    )


def stream_loaders(
    spec: RecipeSpec, data: StreamDataset, runtime: Runtime, rank: int, world_size: int, micro: int
):
    """Loaders over shards: the train epoch plan read by Ray Data (in a Ray Train worker) or in this
    process; val/test split by row group across ranks, each sample counted once."""
    from scalelab.config.settings import runtime_settings
    from scalelab.data.stream import EvalLoader, PlanLoader, RayDataLoader, StreamConfig

    d = spec.data
    detection = spec.model.task == "detection"
    if detection != (data.task == "detection"):
        raise ConfigError(
            f"model.task is {spec.model.task!r} but the streamed dataset {data.name!r} is {data.task}: "
            f"use a {spec.model.task} dataset (detection: data.kind scenes or coco)"
        )
    augment = allowed_augment(d.augment, data.hflip_ok)
    if detection:
        augment = detection_augment(augment)

    source = replace(data.source, retry_s=d.read_retry_s)

    def config(split: str, augment=None) -> StreamConfig:
        return StreamConfig(
            source,
            data.meta["shards"][split],
            int(data.meta["row_group_rows"]),
            data.channels,
            data.mean,
            data.std,
            augment,
            spec.train.seed,
            object_store_mb=d.stream_object_store_mb,
            detection=detection,
            max_boxes=int(data.meta.get("max_boxes", 0)),
        )

    where = dict(device=runtime.device, channels_last=runtime.channels_last)
    Train = RayDataLoader if getattr(data, "reader", "local") == "ray" else PlanLoader  # noqa: N806
    train = Train(
        config("train", augment),
        micro,
        window=d.shuffle_window,
        rank=rank,
        world_size=world_size,
        sample_log=runtime_settings().sample_log,
        **where,
    )
    evals = [
        EvalLoader(data.splits[s], config(s), rank=rank, world_size=world_size, **where)
        for s in ("val", "test")
    ]
    return train, *evals


def build_lr_scheduler(spec: RecipeSpec, optimizer: torch.optim.Optimizer, micro_batches: int):
    """The recipe's LR schedule over optimiser steps (micro-batches / grad_accum_steps per epoch)."""
    t = spec.train
    steps_per_epoch = max(1, micro_batches // t.grad_accum_steps)
    total_steps = steps_per_epoch * t.epochs
    warmup = int(t.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(t.schedule, s, total_steps, warmup)
    )


def report_epoch(report: Report, metrics: dict[str, Any], state: tuple | None, rank: int) -> None:
    """Report an epoch's metrics; with ``state`` (model, optimizer, scheduler, history, meta), also
    a checkpoint, which rank 0 writes (every rank reports, as Ray Train requires)."""
    if state is None:
        report(metrics, None)
        return
    model, optimizer, scheduler, history, meta = state
    with tempfile.TemporaryDirectory(prefix="scalelab-ckpt-") as tmp:
        if rank == 0:
            save_training_checkpoint(tmp, model, optimizer, scheduler, history[-1]["epoch"], history, meta)
        report(metrics, tmp if rank == 0 else None)


def train_one_epoch(
    spec: RecipeSpec,
    model: nn.Module,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    runtime: Runtime,
    epoch: int,
    progress: EpochProgress | None = None,
    skip: int = 0,
    on_step: Callable[[int, int, int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One epoch (or its rest: ``skip`` samples of this rank were consumed before a resume).
    ``on_step(epoch, steps, consumed, running metrics)`` runs every ``train.checkpoint_every_steps``
    optimiser steps, except at the epoch's end (the epoch checkpoint covers that)."""
    t = spec.train
    detection = spec.model.task == "detection"
    model.train()
    loader.set_epoch(epoch)
    if skip:
        loader.start_at(skip)
    consumed, steps = skip, skip // max(1, loader.batch_size * t.grad_accum_steps)
    # running sums stay on the device: an .item() per step would sync the GPU every step
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    seen = 0
    _, world_size = world()
    if progress is not None:
        progress.start(epoch + 1, t.epochs, len(loader) - skip // max(1, loader.batch_size))
    start = time.perf_counter()
    memory = RssWatch()
    steady_from: tuple[float, int] | None = None
    warm_at = max(0, len(loader) - skip // max(1, loader.batch_size)) // 20  # after 5% of the epoch
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        last_micro = (i + 1) % t.grad_accum_steps == 0
        sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else _null()
        with sync:
            with runtime.autocast():
                outputs = model(x, with_aux=True)
            loss = task_loss(spec, outputs, y)
            (loss / t.grad_accum_steps).backward()
        if last_micro:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        consumed += len(y)
        loss_sum += loss.detach() * len(y)
        if not detection:
            correct += (outputs[0].detach().argmax(1) == y).sum()
        seen += len(y)
        if i == warm_at:
            memory.warm()
            steady_from = (time.perf_counter(), seen)  # start-up (a loader's first batches) left out
        if progress is not None:
            progress.advance(len(y) * world_size)
        end = consumed >= len(loader) * loader.batch_size
        if on_step is not None and last_micro and steps % t.checkpoint_every_steps == 0 and not end:
            running = {"train_loss": loss_sum.item() / max(1, seen), "lr": optimizer.param_groups[0]["lr"]}
            on_step(epoch, steps, consumed, running)
    if progress is not None:
        progress.finish()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    stop = time.perf_counter()
    elapsed = stop - start
    steady = {}
    if steady_from is not None and seen > steady_from[1]:
        rate = (seen - steady_from[1]) * world_size / max(stop - steady_from[0], 1e-9)
        steady["steady_images_per_s"] = rate
    return {
        "train_loss": loss_sum.item() / max(1, seen),
        **({} if detection else {"train_acc": correct.item() / max(1, seen)}),
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_seconds": elapsed,
        "images_per_s": seen * world_size / max(elapsed, 1e-9),
        **steady,  # after the first 5% of the steps, to the end
        **memory.metrics(),
    }


def task_loss(spec: RecipeSpec, outputs: Any, y: Any) -> torch.Tensor:
    """The recipe's training loss: ``y`` is class labels, or BoxTargets for detection."""
    if spec.model.task == "detection":
        return detection_loss(outputs, y)
    return classification_loss(outputs, y, spec.model.aux_weight, spec.train.label_smoothing)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
