"""Fashion-MNIST training speed per model: images/s, MFU, and the epochs a 30-minute budget buys.

    .venv/bin/python benchmarks/fashion_speed.py [--variants msresnet_m resnet_m ...] [--images N]
    # writes benchmarks/results/fashion_speed.json

Issue 17's time-to-accuracy goal (Fashion-MNIST >= 95% test accuracy, <= 1M params, <= 30 min on
this 2-core CPU) is a race between how fast a model trains and how much it learns per epoch. This
measures the first half for every candidate, in minutes instead of the half hour a full run takes
(``benchmarks/fashion_mnist.py``): each variant trains with ``pipelines/fashion-mnist.yaml``
unchanged but the model (batch 256, its augmentation, ``precision: auto``, both cores, in-process)
for 3 epochs on the first ``--images`` training images, one after the other in one process.

Figures per variant ``<v>``: ``images_per_s_<v>`` (median of epochs 2-3), ``mflops_<v>`` (forward,
one 28 px image), ``params_<v>``, ``mfu_<v>`` (3 x forward FLOPs x images/s over the measured peak of
a bf16 3x3 convolution on this machine, as digits.py reports it), and ``epochs_per_30_min_<v>``:
the full 54k-image training split at that rate (evaluations not counted: an upper bound).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import conv_peak_gflops, refuse_while_stack_runs, write_results  # noqa: E402

RECIPE = REPO / "pipelines" / "fashion-mnist.yaml"
VARIANTS = ["msresnet_m", "resnet_m", "msresnet_s_dw", "msresnet_tiny", "resnet_tiny"]
TRAIN_IMAGES = 54_000  # the recipe's training split (60k less its 10% validation)
BUDGET_S = 30 * 60


def measure(variant: str, images: int, data_dir: Path) -> dict:
    from scalelab.config import load_recipe
    from scalelab.data.catalog import load_dataset
    from scalelab.data.dataset import Split
    from scalelab.models import count_flops, create_model
    from scalelab.train.loop import fit

    with tempfile.TemporaryDirectory(prefix="fashion-speed-") as tmp:
        spec = load_recipe(
            RECIPE,
            [
                f"model.variant={variant}",
                "train.epochs=3",
                "tracking.enabled=false",
                f"data.data_dir={data_dir}",
                f"train.output_dir={tmp}/outputs",
                f"train.storage_path={tmp}/runs",
            ],
        )
        data = load_dataset(spec.data)
        for name, n in (("train", images), ("val", 512), ("test", 512)):  # speed only: small evals
            split = data.splits[name]
            data.splits[name] = Split(split.x[:n], split.y[:n])
        result = fit(spec, data)
    model = create_model(variant, in_chans=1, num_classes=10, image_size=28)
    rate = statistics.median(h["images_per_s"] for h in result.history[1:])
    return {
        "images_per_s": rate,
        "mflops": count_flops(model, 1, 28) / 1e6,
        "params": result.params,
        "precision": result.runtime.precision,
    }


def main() -> None:
    refuse_while_stack_runs()
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--images", type=int, default=5120, help="training images per epoch (default 5120)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    peak = conv_peak_gflops(True)
    figures: dict = {
        "recipe": "pipelines/fashion-mnist.yaml (model.variant varied; 3 epochs on the first "
        f"{args.images} training images, images/s = median of epochs 2-3)",
        "conv_peak_bf16_gflops": round(peak, 1),
    }
    with tempfile.TemporaryDirectory(prefix="fashion-speed-data-") as data_dir:
        for variant in args.variants:
            m = measure(variant, args.images, Path(data_dir))
            train_gflops = 3 * m["mflops"] * m["images_per_s"] / 1e3
            these = {
                f"images_per_s_{variant}": round(m["images_per_s"], 1),
                f"mflops_{variant}": round(m["mflops"], 1),
                f"params_{variant}": m["params"],
                f"mfu_{variant}": round(train_gflops / peak, 4),
                f"epochs_per_30_min_{variant}": round(BUDGET_S * m["images_per_s"] / TRAIN_IMAGES, 1),
            }
            figures.update(these)
            figures["precision"] = m["precision"]
            print(variant, these, flush=True)
    write_results("fashion_speed", figures)


if __name__ == "__main__":
    main()
