"""Streaming (Parquet shards read by Ray Data) against the in-memory path, on this machine.

One run measures, side by side:
- ``stream_vs_memory_train_ratio``: steady-state training images/s (after the epoch's first 5% of
  steps) of ``msresnet_m`` on Fashion-MNIST (the first ``--ratio-subset`` training images, so the
  part fits ~10 min) in one Ray Train worker, streamed (Ray Data decodes on the other core) / in
  memory, in the last of ``--ratio-epochs`` (2) epochs (an epoch whose reader started during the
  previous epoch's evaluation, as every epoch but a run's first). ``--ratio-rounds`` (3) interleaved
  pairs of runs (memory, stream, memory, stream, ...): the figure is the median of the per-round
  ratios, ``stream_vs_memory_train_ratio_rounds`` lists them (their spread is the noise);
  ``stream_vs_memory_epoch_ratio``: the same over the whole epoch (what is left of the reader's
  start-up included); ``first_epoch_stream_vs_memory_train_ratio_rounds``: each round's first epoch
  (a fresh reader);
- ``decode_augment_images_per_s_per_core``: the streaming path's Parquet read + decode (the
  shards keep the source JPEGs' bytes) + augment (uint8, in the Ray Data task) + normalise (per
  batch, in the consumer) of a generated 96 px dataset, all on one core, and
  ``pil_decode_images_per_s_per_core``: PIL alone decoding the same source JPEG files on one core
  (the ceiling);
- a large generated dataset (``--images`` 96 px JPEGs): ``prepare_images_per_s`` (folder -> shards
  on Ray), ``train_images_per_s`` (one epoch streamed in one Ray Train worker), and that worker's
  memory against its cap. ``worker_memory_cap_mb`` is the whole worker's Ray ``memory`` reservation
  (``train.memory_per_worker_mb`` = ``--worker-baseline-mb``, what torch, Ray and the model take
  before any data, ~0.45-0.5 GB, + ``--data-budget-mb``, what the worker may spend on data:
  ``data.memory_budget_mb``). Goals: ``dataset_decoded_mb`` >= 4x ``worker_memory_cap_mb``
  (``dataset_to_cap``) and ``peak_worker_rss_mb`` (all of the worker's resident memory as the kernel
  counts it, shared object-store pages included: the kernel's high-water mark from the epoch's
  first 5% of steps on) <= ``worker_memory_cap_mb``
  (``peak_worker_rss_within_cap``). Beside them: ``worker_private_growth_mb`` (private memory,
  ``RssAnon``, sampled peak minus its level once warm: what the data added; goal <= the data budget),
  ``worker_private_baseline_mb``, ``peak_worker_shmem_mb`` (Ray object-store pages mapped zero-copy,
  bounded by ``object_store_limit_mb``: ``data.stream_object_store_mb``) and ``dataset_to_data_budget``;
- ``resume_repeated_samples`` / ``resume_skipped_samples``: a Ray Train worker of two killed mid-epoch
  right after a step checkpoint; the resumed epoch's sample ids against the epoch plan (goal 0, 0).

    .venv/bin/python benchmarks/streaming.py            # ~20-25 min on 2 idle cores
    .venv/bin/python benchmarks/streaming.py --only ratio   # the ratio alone (~10 min), merged into
                                                            # the existing results file
    .venv/bin/python benchmarks/streaming.py --quick    # tiny sizes, proves the script works;
                                                        # figures go to a temp folder, not results/

Needs /usr/share/datasets/fashion-mnist (`make system-deps`) unless --quick (digits instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median, refuse_while_stack_runs, write_results  # noqa: E402
from scalelab.config import load_recipe  # noqa: E402
from scalelab.data.catalog import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUIET = ["tracking.enabled=false", "train.threads=1"]


def train_history(recipe: str, overrides: list[str]) -> list[dict]:
    """One Ray Train run (1 worker unless overridden); every epoch's figures."""
    from scalelab.train.api import run_training

    out = run_training(load_recipe(REPO / "pipelines" / recipe, QUIET + overrides))
    return out.history


def train_images_per_s(recipe: str, overrides: list[str]) -> dict:
    """One Ray Train run (1 worker unless overridden); its last epoch's figures."""
    return train_history(recipe, overrides)[-1]


def fashion_subset(work: Path, train: int, test: int) -> Path:
    """The first ``train`` Fashion-MNIST training images and ``test`` test images as an ``.npz``
    (kind ``npz``: the recipe's splits, val taken from ``train``): a run short enough to repeat."""
    from scalelab.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

    root = Path(FASHION_MNIST_DIR)

    def idx(name: str, n: int) -> np.ndarray:
        return read_idx(next(root.glob(f"{name}*")))[:n]

    path = work / "fashion-subset.npz"
    np.savez(
        path,
        x=idx("train-images-idx3-ubyte", train),
        y=idx("train-labels-idx1-ubyte", train).astype(np.int64),
        x_test=idx("t10k-images-idx3-ubyte", test),
        y_test=idx("t10k-labels-idx1-ubyte", test).astype(np.int64),
        classes=np.asarray(FASHION_MNIST_CLASSES),
    )
    return path


def stream_vs_memory(quick: bool, variant: str, epochs: int, rounds: int, subset: int, work: Path) -> dict:
    """``rounds`` x (an in-memory run, then a streamed run) of the same model on the same data; each
    round's ratio is its stream run's steady images/s over its memory run's, in the last epoch; the
    figure is the median over rounds (interleaving spreads the machine's drifts over both paths)."""
    recipe = "digits.yaml" if quick else "fashion-mnist.yaml"
    common = [f"train.epochs={epochs}", "train.workers=1", "train.cpus_per_worker=1"]
    common += ["model.variant=msresnet_tiny"] if quick else [f"model.variant={variant}"]
    data = ["data.name=digits"] if quick else []
    if not quick:  # a Fashion-MNIST training subset (the official test split cut to 1,000 images)
        npz = fashion_subset(work, subset, 1000)
        data = ["data.kind=npz", f"data.source={npz}", "data.name=fashion-subset"]
    stream = [*data[:-1], f"{data[-1]}_shards", "data.format=stream"]
    memory = [*data, "data.format=memory"]
    prepare(load_recipe(REPO / "pipelines" / recipe, memory).data)
    prepare(load_recipe(REPO / "pipelines" / recipe, stream).data)
    per_round, first, pairs = [], [], []
    for r in range(rounds):
        memory_h = train_history(recipe, common + memory + [f"train.run_name=memory{r}"])
        stream_h = train_history(recipe, common + stream + [f"train.run_name=stream{r}"])
        m, s = memory_h[-1], stream_h[-1]
        pairs.append((m, s))
        per_round.append(s["steady_images_per_s"] / m["steady_images_per_s"])
        first.append(stream_h[0]["steady_images_per_s"] / memory_h[0]["steady_images_per_s"])
        print(
            f"round {r}: memory {m['steady_images_per_s']:.1f} img/s, stream "
            f"{s['steady_images_per_s']:.1f} img/s, ratio {per_round[-1]:.3f}",
            flush=True,
        )
    return {
        # steady state: after the epoch's first 5% of steps; with --ratio-epochs >= 2 the last epoch
        # is one whose reader started during the previous epoch's evaluation (as every epoch but a
        # run's first); the first epoch's ratios (a fresh reader) are kept beside them
        "stream_vs_memory_train_ratio": median(per_round),
        "stream_vs_memory_train_ratio_rounds": [round(x, 4) for x in per_round],
        "stream_vs_memory_train_ratio_spread": max(per_round) - min(per_round),
        "memory_train_images_per_s": median([m["steady_images_per_s"] for m, _ in pairs]),
        "stream_train_images_per_s": median([s["steady_images_per_s"] for _, s in pairs]),
        "stream_vs_memory_epoch_ratio": median([s["images_per_s"] / m["images_per_s"] for m, s in pairs]),
        "memory_epoch_images_per_s": median([m["images_per_s"] for m, _ in pairs]),
        "stream_epoch_images_per_s": median([s["images_per_s"] for _, s in pairs]),
        "first_epoch_stream_vs_memory_train_ratio_rounds": [round(x, 4) for x in first],
        "ratio_rounds": rounds,
        "ratio_epochs": epochs,
        "ratio_dataset": "digits" if quick else f"fashion-mnist (first {subset} training images)",
        "ratio_train_images_per_epoch": round(pairs[0][0]["images_per_s"] * pairs[0][0]["epoch_seconds"]),
        "ratio_model_variant": "msresnet_tiny" if quick else variant,
    }


def write_jpegs(root: Path, n: int, size: int, classes: int = 10) -> None:
    """``n`` smooth colour 96 px JPEGs in ``classes`` folders (a class-tinted gradient + noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 180, size, dtype=np.float32)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        img = np.stack([ramp[None, :] + ramp[:, None] * (k == c % 3) for k in range(3)], -1) / 2
        img = img + rng.integers(0, 40, (size, size, 3)) + 20 * (c // 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            root / f"class{c:02d}" / f"{i:07d}.jpg", quality=90
        )


def decode_rates(folder: Path, shards: Path, images: int) -> dict:
    """One core: PIL decoding the source JPEGs, and the stream path's read+decode+augment+normalise."""
    import torch
    from PIL import Image

    from scalelab.artifacts.preprocess import pixel_scale
    from scalelab.config.specs import AugmentSpec
    from scalelab.data.shards import open_sharded
    from scalelab.data.stream import StreamConfig, decode_window, epoch_windows, normalise_batch

    torch.set_num_threads(1)
    files = sorted(folder.rglob("*.jpg"))[:images]
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for f in files:
            with Image.open(f) as img:
                img.convert("RGB").load()
        rates.append(len(files) / (time.perf_counter() - start))
    pil = median(rates)

    ds = open_sharded(shards)
    cfg = StreamConfig(
        ds.source,
        ds.meta["shards"]["train"],
        int(ds.meta["row_group_rows"]),
        ds.channels,
        ds.mean,
        ds.std,
        AugmentSpec(hflip=True, crop_padding=4),
    )
    mean_px, std_px = pixel_scale(cfg.mean, cfg.std)
    rates = []
    for epoch in range(3):
        start, seen = time.perf_counter(), 0
        for i, win in enumerate(epoch_windows(cfg.shards, cfg.row_group_rows, 0, epoch, 8)):
            x = torch.from_numpy(decode_window(cfg, win, epoch, 0, i)["x"])  # uint8 (N, C, H, W)
            for b in range(0, len(x), 64):  # the consumer's share: floats, once per batch
                normalise_batch(x[b : b + 64], mean_px, std_px)
            seen += len(x)
            if seen >= len(files):
                break
        rates.append(seen / (time.perf_counter() - start))
    stream = median(rates)
    return {
        "pil_decode_images_per_s_per_core": pil,
        "decode_augment_images_per_s_per_core": stream,
        "decode_augment_to_pil_ratio": stream / pil,
    }


def large_dataset(folder: Path, n: int, size: int, cap_mb: int, baseline_mb: int, store_mb: int) -> dict:
    """Prepare the JPEG folder into shards on Ray, then train one epoch streamed under the cap."""
    from scalelab.data.shards import open_sharded

    data = [
        "data.kind=imagefolder",
        f"data.source={folder}",
        "data.name=large",
        "data.format=stream",
        f"data.image_size={size}",
        "data.channels=3",
        f"data.memory_budget_mb={cap_mb}",
        f"data.stream_object_store_mb={store_mb}",
    ]
    spec = load_recipe(REPO / "pipelines" / "digits.yaml", QUIET + data)
    start = time.perf_counter()
    path = prepare(spec.data)
    prepare_rate = n / (time.perf_counter() - start)
    meta = open_sharded(path, verify=False).meta
    sizes = meta["split_sizes"]
    decoded_mb = sum(sizes.values()) * size * size * 3 / 1e6
    epoch = train_images_per_s(
        "digits.yaml",
        data
        + [
            "model.variant=msresnet_tiny",
            "model.stem=large",
            "train.epochs=1",
            "train.batch_size=64",
            "train.workers=1",
            f"train.memory_per_worker_mb={baseline_mb + cap_mb}",
            "train.run_name=large",
        ],
    )
    return {
        "dataset_images": n,
        "dataset_decoded_mb": decoded_mb,
        "worker_memory_cap_mb": baseline_mb + cap_mb,
        "dataset_to_cap": decoded_mb / (baseline_mb + cap_mb),
        "peak_worker_rss_mb": epoch.get("peak_rss_mb"),
        "peak_worker_rss_within_cap": bool(
            epoch.get("peak_rss_mb") is not None and epoch["peak_rss_mb"] <= baseline_mb + cap_mb
        ),
        "worker_data_budget_mb": cap_mb,
        "dataset_to_data_budget": decoded_mb / cap_mb,
        "worker_private_growth_mb": epoch.get("rss_anon_growth_mb"),
        "worker_private_baseline_mb": epoch.get("rss_anon_warm_mb"),
        "peak_worker_private_mb": epoch.get("peak_rss_anon_mb"),
        "peak_worker_shmem_mb": epoch.get("peak_rss_shmem_mb"),
        "object_store_limit_mb": store_mb,
        "worker_rss_growth_mb": epoch.get("rss_growth_mb"),
        "worker_rss_anon_mb_at_end": epoch.get("rss_anon_mb"),
        "worker_rss_shmem_mb_at_end": epoch.get("rss_shmem_mb"),
        "shards_kept_original_bytes": meta["source"]["kept_original_bytes"],
        "shards_reencoded_png": meta["source"]["reencoded_png"],
        "prepare_images_per_s": prepare_rate,
        "train_images_per_s": epoch["images_per_s"],
        "shard_path": str(path),
    }


def resume_exactness(work: Path) -> dict:
    """Two workers on digits shards; rank 1 exits right after the step-10 checkpoint of epoch 2."""
    from scalelab.data.shards import open_sharded
    from scalelab.data.stream import planned_ids
    from scalelab.train.api import run_training
    from scalelab.train.loop import per_worker_batch

    log, marker = work / "samples.jsonl", work / "killed"
    os.environ["SCALELAB_SAMPLE_LOG"] = str(log)
    os.environ["SCALELAB_FAULT_INJECT"] = f"rank=1,epoch=1,step=10,marker={marker}"
    try:
        spec = load_recipe(
            REPO / "pipelines" / "digits.yaml",
            QUIET
            + [
                "data.name=digits_shards",
                "data.format=stream",
                "data.row_group_rows=32",
                "model.variant=msresnet_tiny",
                "train.batch_size=64",
                "train.epochs=2",
                "train.workers=2",
                "train.cpus_per_worker=0.5",
                "train.checkpoint_every_steps=5",
                "train.run_name=resume",
            ],
        )
        out = run_training(spec)
    finally:
        del os.environ["SCALELAB_SAMPLE_LOG"], os.environ["SCALELAB_FAULT_INJECT"]
    at = out.history[1]["resumed_at_sample"]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    first = {r["pid"] for r in rows if r["epoch"] == 0}
    data = open_sharded(Path(spec.data.data_dir) / spec.data.name)
    repeated = skipped = rolled_back = 0
    for rank in (0, 1):
        mine = [r for r in rows if r["epoch"] == 1 and r["rank"] == rank]
        kept = [i for r in mine if r["pid"] in first and r["start"] < at for i in r["ids"]]
        rolled_back += sum(len(r["ids"]) for r in mine if r["pid"] in first and r["start"] >= at)
        kept += [i for r in mine if r["pid"] not in first for i in r["ids"]]
        plan = planned_ids(
            data.source,
            data.meta["shards"]["train"],
            int(data.meta["row_group_rows"]),  # as prepared (the ratio step may have made them)
            seed=spec.train.seed,
            epoch=1,
            window=spec.data.shuffle_window,
            rank=rank,
            world_size=2,
            batch=per_worker_batch(spec.train.batch_size, 2, 1),
        )
        repeated += len(kept) - len(set(kept))
        skipped += len(set(plan) - set(kept))
    return {
        "resume_killed": marker.exists(),
        "resume_at_sample": at,
        "resume_repeated_samples": repeated,
        "resume_skipped_samples": skipped,
        "resume_rolled_back_samples": rolled_back,  # consumed after the checkpoint, undone by the restart
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, figures meaningless")
    ap.add_argument(
        "--images", type=int, default=None, help="generated 96 px JPEGs (large dataset; 150,000, --quick 600)"
    )
    ap.add_argument("--size", type=int, default=96, help="their side in pixels")
    ap.add_argument(
        "--data-budget-mb",
        "--cap-mb",
        dest="cap_mb",
        type=int,
        default=1024,
        help="what a worker may spend on data (data.memory_budget_mb; goal: its private memory grows less)",
    )
    ap.add_argument(
        "--worker-baseline-mb",
        type=int,
        default=768,
        help="a Ray Train worker's own memory before data (torch, Ray, model); with the data budget: its cap",
    )
    ap.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help="data.stream_object_store_mb: object store one worker's reader may fill (default: the cap)",
    )
    ap.add_argument("--decode-images", type=int, default=3000, help="images timed per decode repeat")
    ap.add_argument(
        "--ratio-variant",
        default="msresnet_m",
        help="model of the stream/memory ratio (msresnet_tiny: a faster model, a harder test of the loader)",
    )
    ap.add_argument(
        "--ratio-epochs",
        type=int,
        default=2,
        help="epochs of each ratio run; the ratio is the last epoch's (first epoch's figures beside it)",
    )
    ap.add_argument(
        "--ratio-rounds",
        type=int,
        default=3,
        help="interleaved (memory, stream) pairs; the ratio: their median",
    )
    ap.add_argument(
        "--ratio-subset",
        type=int,
        default=6000,
        help="Fashion-MNIST training images of the ratio runs (val is 10%% of them)",
    )
    ap.add_argument(
        "--only",
        choices=["all", "ratio"],
        default="all",
        help="ratio: only the stream/memory ratio, merged into the existing results file",
    )
    ap.add_argument("--out", type=Path, default=None, help="results file (default: results/streaming.json)")
    args = ap.parse_args()
    if args.quick:
        args.cap_mb, args.decode_images = 4, 200
    args.images = args.images or (600 if args.quick else 150_000)
    store_mb = args.object_store_mb or args.cap_mb
    if not args.quick and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        raise SystemExit("needs the Debian package dataset-fashion-mnist (`make system-deps`), or --quick")
    refuse_while_stack_runs()

    import ray

    from scalelab.cluster.session import connect_ray

    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        work = Path(tmp)
        (work / "pipelines").symlink_to(REPO / "pipelines")
        os.chdir(work)
        connect_ray(num_cpus=os.cpu_count(), log_to_driver=False)
        figures: dict = {"quick": args.quick}
        try:
            figures.update(
                stream_vs_memory(
                    args.quick,
                    args.ratio_variant,
                    args.ratio_epochs,
                    args.ratio_rounds,
                    args.ratio_subset,
                    work,
                )
            )
            print(json.dumps(figures), flush=True)
            if args.only == "ratio":
                return finish(args, figures, merge=True)
            folder = work / "jpegs"
            start = time.perf_counter()
            write_jpegs(folder, args.images, args.size)
            print(f"wrote {args.images} JPEGs in {time.perf_counter() - start:.0f}s", flush=True)
            large = large_dataset(
                folder, args.images, args.size, args.cap_mb, args.worker_baseline_mb, store_mb
            )
            figures.update(decode_rates(folder, Path(large.pop("shard_path")), args.decode_images))
            figures.update(large)
            print(json.dumps(figures), flush=True)
            figures.update(resume_exactness(work))
        finally:
            ray.shutdown()
    finish(args, figures)


def finish(args: argparse.Namespace, figures: dict, merge: bool = False) -> None:
    """Write the figures; ``merge``: over the existing file's (the parts not measured this time stay,
    with the command that measured them)."""
    command = " ".join(["python", "benchmarks/streaming.py", *sys.argv[1:]])
    if merge and (args.out is not None or not args.quick):
        path = args.out or RESULTS / "streaming.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old_command = old.pop("command", None)
        for stale in ("first_epoch_stream_vs_memory_train_ratio", "first_epoch_stream_vs_memory_epoch_ratio"):
            old.pop(stale, None)  # figures of the single-pair ratio this one replaced
        figures = {**old, **figures, "ratio_command": command}
        if old_command:
            figures["command"] = old_command
    else:
        figures["command"] = command
    if args.quick:
        figures["note"] = "--quick: tiny sizes, the figures mean nothing"
    if args.out is not None or not args.quick:
        write_results_to(args.out, figures)
    else:
        quick_out = Path(tempfile.gettempdir()) / "streaming_quick.json"
        quick_out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {quick_out} (--quick: not the results folder)")


def write_results_to(path: Path | None, figures: dict) -> None:
    if path is None:
        write_results("streaming", figures)
    else:
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
