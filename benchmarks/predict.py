"""Batch prediction benchmark: `scalelab predict` on Ray Data vs the bare model on preloaded tensors.

On the Fashion-MNIST test set (10k images; digits with ``--quick`` or without the dataset):

- ``model_only_images_per_s``: the bundle's Predictor in this process, the test images already
  normalised into tensors, forward passes of ``--batch-size`` in the bundle's precision, with
  ``--threads`` torch threads: the ceiling.
- ``predict_images_per_s``: ``scalelab predict BUNDLE <dataset version> --replicas 1 --threads T``
  on a local Ray started beforehand (its start is not counted; the replica's start and the Parquet
  writing are): one replica with the same threads, so the ratio is the pipeline's overhead.
  ``predict_steady_images_per_s`` leaves out the replica's start (time to the first rows).
- ``predict_folder_images_per_s``: the same images as PNG files in an ImageFolder (decoding too).

Goal: ``predict_images_per_s / model_only_images_per_s >= 0.8``. Medians of ``--repeats`` runs.

    .venv/bin/python benchmarks/predict.py [--bundle DIR] [--threads 2]   # writes results/predict.json
    .venv/bin/python benchmarks/predict.py --quick          # a tiny check that it runs (prints only)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_bundle(dataset: str, work: Path, quick: bool) -> Path:
    """The recipe's model trained one epoch (``--quick``: untrained msresnet_tiny; speed is the point)."""
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    overrides = ["tracking.enabled=false", "train.run_name=bench-predict", "train.epochs=1"]
    if quick:
        overrides += ["model.variant=msresnet_tiny", "train.threads=1"]
    spec = load_recipe(work / "pipelines" / f"{dataset}.yaml", overrides)
    print(f"training {dataset} ({spec.model.variant}) for 1 epoch for the benchmark's bundle...")
    return run_training(spec).model_dir.resolve()


def model_only(bundle: Path, x: np.ndarray, batch_size: int, threads: int, repeats: int) -> float:
    import torch

    from scalelab.artifacts.predictor import Predictor
    from scalelab.artifacts.preprocess import normalise

    torch.set_num_threads(threads)
    predictor = Predictor.from_bundle(bundle)
    batches = [normalise(x[i : i + batch_size], predictor.input) for i in range(0, len(x), batch_size)]
    if predictor.runtime.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    rates = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            began = time.perf_counter()
            for b in batches:
                with predictor.runtime.autocast():
                    torch.softmax(predictor.model(b).float(), dim=1)
            rates.append(len(x) / (time.perf_counter() - began))
    return median(rates[1:])


def write_folder(x: np.ndarray, y: np.ndarray, classes: list[str], root: Path) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        (folder / f"{i:05d}.png").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Model bundle folder (default: train the recipe's model 1 epoch).")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="digits, an untrained tiny model, 1 repeat")
    args = ap.parse_args()
    if not args.quick:
        refuse_while_stack_runs()
    import ray

    from scalelab.config import load_recipe
    from scalelab.data.catalog import prepare
    from scalelab.data.dataset import read_prepared
    from scalelab.predict.commands import predict_command

    dataset = "digits" if args.quick or not FASHION.is_dir() else "fashion-mnist"
    repeats = 1 if args.quick else args.repeats
    given_bundle = Path(args.bundle).resolve() if args.bundle else None  # before the chdir below
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        (work / "pipelines").symlink_to(REPO / "pipelines")
        os.chdir(work)
        prepared = prepare(load_recipe(work / "pipelines" / f"{dataset}.yaml").data)
        data = read_prepared(prepared)
        test = data.splits["test"]
        bundle = given_bundle or make_bundle(dataset, work, args.quick)
        write_folder(test.x, test.y, data.classes, work / "images")

        ceiling = model_only(bundle, test.x, args.batch_size, args.threads, repeats)
        print(f"model only: {ceiling:,.0f} images/s ({args.threads} threads)")
        ray.init(
            num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False
        )
        runs, folder_runs = [], []
        options = {"replicas": 1, "threads": args.threads, "batch_size": args.batch_size, "quiet": True}
        for i in range(repeats):
            began = time.perf_counter()
            s = predict_command(str(bundle), dataset, out=str(work / f"p{i}.parquet"), **options)
            runs.append({**s.to_dict(), "wall_s": time.perf_counter() - began})
            print(f"predict (dataset): {s.images_per_s:,.0f} images/s, steady {s.steady_images_per_s:,.0f}")
            f = predict_command(str(bundle), "images", out=str(work / f"f{i}.parquet"), **options)
            folder_runs.append(f.to_dict())
            print(
                f"predict (PNG folder): {f.images_per_s:,.0f} images/s, steady {f.steady_images_per_s:,.0f}"
            )
        ray.shutdown()
    rate = median([r["images_per_s"] for r in runs])
    figures = {
        "dataset": dataset,
        "images": len(test.y),
        "model": runs[0]["model"],
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": repeats,
        "quick": args.quick,
        "model_only_images_per_s": round(ceiling, 1),
        "predict_images_per_s": round(rate, 1),
        "predict_steady_images_per_s": round(median([r["steady_images_per_s"] for r in runs]), 1),
        "predict_startup_s": round(median([r["startup_s"] for r in runs]), 2),
        "predict_wall_s": round(median([r["wall_s"] for r in runs]), 2),
        "predict_folder_images_per_s": round(median([r["images_per_s"] for r in folder_runs]), 1),
        "predict_vs_model_only": round(rate / ceiling, 3),
        "accuracy": runs[0]["accuracy"],
        "goal": "predict_images_per_s / model_only_images_per_s >= 0.8",
    }
    if args.quick:  # a check that it runs, not figures: printed, never written over the results
        print(json.dumps(figures, indent=2))
    else:
        write_results("predict", figures)


if __name__ == "__main__":
    main()
