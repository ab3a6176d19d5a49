"""Fashion-MNIST: the default recipe (<= 1M params) vs its plain ResNet partner at matched params.

    .venv/bin/python benchmarks/fashion_mnist.py [--epochs N] [--skip-baseline]
    # writes benchmarks/results/fashion_mnist.json

Needs the Debian package dataset-fashion-mnist (`make system-deps`): /usr/share/datasets/fashion-mnist.
Both runs use ``pipelines/fashion-mnist.yaml`` unchanged except the model: ``msresnet_m``
(multi-scale, scales=4) and ``resnet_m`` (scales=1, widths sized to the same parameter count).
Training runs in-process on every CPU (``train.workers=0``), tracking off; test accuracy is on the
official 10k test split. On this 2-core machine one run takes tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, refuse_while_stack_runs, write_results  # noqa: E402

MAX_PARAMS = 1_000_000


def train(variant: str, epochs: int | None, workdir: Path) -> dict:
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training
    from scalelab.train.evaluate_cmd import evaluate_bundle

    overrides = [
        f"model.variant={variant}",
        "tracking.enabled=false",
        f"train.run_name=fmnist-{variant}",
        f"train.storage_path={workdir / 'runs'}",
        f"train.output_dir={workdir / 'outputs'}",
        f"data.data_dir={REPO / 'data'}",
    ]
    if epochs:
        overrides.append(f"train.epochs={epochs}")
    spec = load_recipe(REPO / "pipelines" / "fashion-mnist.yaml", overrides)
    started = time.perf_counter()
    out = run_training(
        spec,
        on_epoch=lambda m: print(
            f"  {variant} epoch {m['epoch']:>2} val_acc {m['val_acc']:.4f} {m['images_per_s']:,.0f} img/s "
            f"{m['epoch_seconds']:.0f}s",
            flush=True,
        ),
    )
    wall = time.perf_counter() - started
    recipe = str(REPO / "pipelines" / "fashion-mnist.yaml")
    # the same weights scored both ways: what test-time flipping adds (training is the same either way)
    scored = {
        flip: evaluate_bundle(out.model_dir, recipe, overrides, test_time_flip=flip) for flip in (True, False)
    }
    return {
        "variant": variant,
        "test_acc": out.metrics["test_acc"],
        "params": out.metrics["params"],
        "wall_minutes": round(wall / 60, 2),
        "epochs": spec.train.epochs,
        "precision": out.metrics["precision"],
        "test_time_flip": spec.model.test_time_flip,
        "test_acc_with_flip": scored[True]["test_acc"],
        "test_acc_without_flip": scored[False]["test_acc"],
        "val_acc_by_epoch": [round(h["val_acc"], 4) for h in out.history],
        "train_images_per_s_median": round(statistics.median(h["images_per_s"] for h in out.history), 1),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    refuse_while_stack_runs()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help="Override the recipe's epochs (a quicker run).")
    ap.add_argument("--skip-baseline", action="store_true", help="Only the multi-scale recipe.")
    args = ap.parse_args()
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        raise SystemExit("needs the Debian package dataset-fashion-mnist (`make system-deps`)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-fmnist-"))
    os.chdir(REPO)
    best = train("msresnet_m", args.epochs, workdir)
    if best["params"] > MAX_PARAMS:
        raise SystemExit(f"msresnet_m has {best['params']:,} params, over the {MAX_PARAMS:,} budget")
    figures = {
        "test_acc": best["test_acc"],
        "params": best["params"],
        "wall_minutes": best["wall_minutes"],
        "test_acc_with_flip": best["test_acc_with_flip"],
        "test_acc_without_flip": best["test_acc_without_flip"],
    }
    runs = [best]
    if not args.skip_baseline:
        base = train("resnet_m", args.epochs, workdir)
        runs.append(base)
        figures.update(
            baseline_test_acc=base["test_acc"],
            baseline_params=base["params"],
            baseline_wall_minutes=base["wall_minutes"],
            baseline_test_acc_with_flip=base["test_acc_with_flip"],
            baseline_test_acc_without_flip=base["test_acc_without_flip"],
        )
    gpu = RESULTS / "gpu_fashion_runs.json"  # written by benchmarks/gpu_fashion.py on a lent GPU
    if gpu.is_file():
        kept = {k: v for k, v in json.loads(gpu.read_text()).items() if k.startswith("gpu_")}
        figures.update(kept, gpu_source="benchmarks/results/gpu_fashion_runs.json")
    figures.update(
        runs=runs,
        goal="test_acc >= 0.95 within 30 min on this machine, <= 1M params",
        goal_met=bool(best["test_acc"] >= 0.95 and best["wall_minutes"] <= 30),
        command="python benchmarks/fashion_mnist.py",
    )
    write_results("fashion_mnist", figures)


if __name__ == "__main__":
    main()
