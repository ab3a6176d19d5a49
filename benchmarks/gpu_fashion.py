"""Fashion-MNIST on one GPU: seconds to 95% test accuracy with bf16 autocast + channels_last.

Runs the same per-worker loop Ray Train runs (``scalelab.train.loop.fit``), in-process on one
GPU (the device machine has no Ray). The official 10k test set is evaluated after every epoch
(it is the ``val`` split here, so the time to 95% can be read off), and training uses all 60k
training images. Several epoch budgets run in one call, since a one-cycle schedule reaches its
best accuracy only at its end.

    python benchmarks/gpu_fashion.py --data /usr/share/datasets/fashion-mnist \
        --configs 30:512:0.2 40:1024:0.4 --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scalelab.config import load_recipe
from scalelab.data.catalog import read_raw
from scalelab.train.loop import fit


def run(data_path: str, epochs: int, batch: int, lr: float, variant: str, data=None) -> dict:
    # the Fashion-MNIST recipe itself, on the GPU: only the device, the epoch budget and the
    # batch/LR (scaled for a GPU's bigger batches) change
    spec = load_recipe(
        Path(__file__).resolve().parents[1] / "pipelines" / "fashion-mnist.yaml",
        [
            f"data.source={data_path}",
            "data.val_fraction=0.0",
            f"model.variant={variant}",
            f"train.epochs={epochs}",
            f"train.batch_size={batch}",
            f"train.lr={lr}",
            "train.use_gpu=true",
            "train.precision=bf16",
        ],
    )
    if data is None:
        data = read_raw(spec.data)
        data.splits["val"] = data.splits["test"]  # per-epoch test accuracy, for the time-to-95% figure
    torch.cuda.synchronize()
    start = time.perf_counter()
    curve: list[tuple[float, float]] = []

    def report(metrics, _ckpt):
        curve.append((time.perf_counter() - start, metrics["val_acc"]))
        print(
            f"  epoch {metrics['epoch']:>2} test_acc {metrics['val_acc']:.4f} "
            f"{metrics['images_per_s']:,.0f} img/s t={curve[-1][0]:.1f}s",
            flush=True,
        )

    result = fit(spec, data, report=report)
    total = time.perf_counter() - start
    to95 = next((t for t, acc in curve if acc >= 0.95), None)
    return {
        "epochs": epochs,
        "batch_size": batch,
        "lr": lr,
        "variant": variant,
        "params": result.params,
        "test_acc": result.test.accuracy,
        "seconds_total": round(total, 2),
        "seconds_to_95": round(to95, 2) if to95 is not None else None,
        "best_test_acc": max(a for _, a in curve),
        "precision": result.runtime.precision,
        "test_time_flip": spec.model.test_time_flip,
    }, data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument(
        "--configs", nargs="+", default=["30:512:0.2", "40:1024:0.4"], help="EPOCHS:BATCH:LR, run in order"
    )
    ap.add_argument("--variant", default="msresnet_m")
    ap.add_argument("--out", default="benchmarks/results/gpu_fashion_runs.json")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    runs, data = [], None
    for cfg in args.configs:
        epochs, batch, lr = cfg.split(":")
        print(f"run: {epochs} epochs, batch {batch}, lr {lr}", flush=True)
        res, data = run(args.data, int(epochs), int(batch), float(lr), args.variant, data)
        runs.append(res)
        print(json.dumps(res), flush=True)
    reached = [r["seconds_to_95"] for r in runs if r["seconds_to_95"] is not None]
    summary = {
        "gpu_seconds_to_95": min(reached) if reached else None,
        "gpu_device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
