"""Digits: default multi-scale variant vs the scales=1 baseline at matched parameters, 3 seeds.

Also checks that bf16 autocast + channels_last (selected automatically on CPUs with native bf16)
keeps accuracy, and reports model FLOPs utilisation against the measured bf16 conv peak.

    .venv/bin/python benchmarks/digits.py [--seeds 0 1 2] [--epochs N]   # N: the recipe's (15)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
from common import conv_peak_gflops, median, refuse_while_stack_runs, write_results  # noqa: E402
from scalelab.config import load_recipe  # noqa: E402
from scalelab.data import load_dataset  # noqa: E402
from scalelab.models import count_flops, create_model  # noqa: E402
from scalelab.train.loop import fit  # noqa: E402


def run(variant: str, seed: int, epochs: int, precision: str, data_dir: str) -> dict:
    # the committed recipe, so the figure is the default's: only model, seed and precision vary
    spec = load_recipe(
        REPO / "pipelines" / "digits.yaml",
        [
            f"model.variant={variant}",
            f"train.epochs={epochs}",
            f"train.seed={seed}",
            f"train.precision={precision}",
            f"data.data_dir={data_dir}",
            "tracking.enabled=false",
        ],
    )
    data = load_dataset(spec.data)
    t = time.perf_counter()
    result = fit(spec, data)
    wall = time.perf_counter() - t
    steady = median([h["images_per_s"] for h in result.history[2:]])
    return {"acc": result.test.accuracy, "seconds": wall, "params": result.params, "images_per_s": steady}


def main() -> None:
    refuse_while_stack_runs()
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's train.epochs")
    args = ap.parse_args()
    recipe = load_recipe(REPO / "pipelines" / "digits.yaml")
    args.epochs = args.epochs or recipe.train.epochs
    torch.set_num_threads(2)
    data_dir = tempfile.mkdtemp(prefix="bench-digits-")
    rows: dict[str, list[dict]] = {"multi": [], "base": [], "multi_fp32": []}
    for seed in args.seeds:
        rows["multi"].append(run("msresnet_s", seed, args.epochs, "auto", data_dir))
        rows["base"].append(run("resnet_s", seed, args.epochs, "auto", data_dir))
        rows["multi_fp32"].append(run("msresnet_s", seed, args.epochs, "fp32", data_dir))
        print(seed, {k: v[-1] for k, v in rows.items()}, flush=True)

    def mean(key: str, field: str) -> float:
        return sum(r[field] for r in rows[key]) / len(rows[key])

    flops_fwd = count_flops(create_model("msresnet_s", in_chans=1, num_classes=10, image_size=8), 1, 8)
    train_flops_per_s = 3 * flops_fwd * median([r["images_per_s"] for r in rows["multi"]])
    peak_bf16 = conv_peak_gflops(True)
    figures = {
        "test_acc_multiscale": round(mean("multi", "acc"), 4),
        "test_acc_baseline": round(mean("base", "acc"), 4),
        "params_multiscale": rows["multi"][0]["params"],
        "params_baseline": rows["base"][0]["params"],
        "seeds": args.seeds,
        "epochs": args.epochs,
        "train_seconds": round(median([r["seconds"] for r in rows["multi"]]), 2),
        "train_seconds_baseline": round(median([r["seconds"] for r in rows["base"]]), 2),
        "test_acc_multiscale_fp32": round(mean("multi_fp32", "acc"), 4),
        "train_seconds_fp32": round(median([r["seconds"] for r in rows["multi_fp32"]]), 2),
        "bf16_vs_fp32_speedup": round(
            median([r["seconds"] for r in rows["multi_fp32"]])
            / median([r["seconds"] for r in rows["multi"]]),
            2,
        ),
        "per_seed_test_acc_multiscale": [round(r["acc"], 4) for r in rows["multi"]],
        "per_seed_test_acc_baseline": [round(r["acc"], 4) for r in rows["base"]],
        "train_images_per_s": round(median([r["images_per_s"] for r in rows["multi"]]), 1),
        "conv_peak_bf16_gflops": round(peak_bf16, 1),
        "mfu_vs_bf16_conv_peak": round(train_flops_per_s / 1e9 / peak_bf16, 4),
        "recipe": "pipelines/digits.yaml (model.variant, train.seed, train.precision varied)",
        "label_smoothing": recipe.train.label_smoothing,
        "batch_size": recipe.train.batch_size,
        "lr": recipe.train.lr,
    }
    write_results("digits", figures)


if __name__ == "__main__":
    main()
