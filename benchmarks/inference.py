"""Inference benchmark: forward passes with BatchNorm folded into the convs (models/fold.py) vs not.

What the serving replicas, ``scalelab predict``, evaluation and the promotion gate run
(``Predictor`` folds since session 28). Per model and batch size, on one torch thread (a 1-CPU
replica): the model with its BatchNorm layers and the same model folded, alternating in each
round, timed per forward pass (medians of the passes, then of the rounds); in bf16 autocast with
channels_last where this CPU has bf16 (as ``Predictor`` picks for a bundle trained in bf16), and
in fp32. Also the largest difference of their outputs, in the same precision (fp32: float
rounding; bf16: the two round differently, which can flip an image near a tie).
BN statistics and affine terms are randomised first (fresh ones are the identity: folding them
would be too easy to get right).

    .venv/bin/python benchmarks/inference.py [--rounds 5] [--passes 40]
    .venv/bin/python benchmarks/inference.py --quick    # 1 round, few passes: proves it runs
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_figures  # noqa: E402

MODELS = (  # (variant, input size): Fashion-MNIST's 28 px for the classifiers, scenes' 96 px
    ("msresnet_m", 28),
    ("resnet_m", 28),
    ("msresnet_tiny", 28),
    ("msdet_s", 96),
)
BATCHES = (1, 16)


def randomise_bn(model):
    import torch

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def max_abs_diff(a, b) -> float:
    """The largest difference over every output tensor (logits; a detector's heatmap and boxes)."""
    flat = lambda o: list(o) if isinstance(o, tuple | list) else [o]  # noqa: E731
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(flat(a), flat(b), strict=True))


def time_passes(model, x, passes: int, bf16: bool) -> float:
    import torch

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            model(x)
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=40, help="Timed forward passes per model per round.")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    refuse_while_stack_runs()
    rounds, passes = (1, 5) if args.quick else (args.rounds, args.passes)

    import torch

    from scalelab.artifacts.hardware import cpu_has_fast_bf16
    from scalelab.models import create_model
    from scalelab.models.fold import fold_batchnorm

    torch.set_num_threads(1)
    precisions = ["bf16", "fp32"] if cpu_has_fast_bf16() else ["fp32"]
    figures: dict = {
        "threads": 1,
        "rounds": rounds,
        "passes_per_round": passes,
        "precisions": precisions,
        "note": "median ms per forward pass (median of passes, then of rounds); plain and folded "
        "alternate within each round; bf16 = autocast + channels_last, fp32 = contiguous",
    }
    started = time.perf_counter()
    for variant, size in MODELS:
        plain = randomise_bn(create_model(variant, in_chans=1, num_classes=10, image_size=size))
        folded = copy.deepcopy(plain)
        figures[f"{variant}_batchnorms_folded"] = fold_batchnorm(folded)
        for precision in precisions:
            bf16 = precision == "bf16"
            fmt = torch.channels_last if bf16 else torch.contiguous_format
            a, b = copy.deepcopy(plain).to(memory_format=fmt), copy.deepcopy(folded).to(memory_format=fmt)
            for batch in BATCHES:
                x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    diff = max_abs_diff(a(x), b(x))  # in the precision timed: bf16 rounds differently
                runs: dict[str, list[float]] = {"plain": [], "folded": []}
                for r in range(rounds):
                    order = (("plain", a), ("folded", b)) if r % 2 == 0 else (("folded", b), ("plain", a))
                    for name, model in order:
                        runs[name].append(time_passes(model, x, passes, bf16))
                key = f"{variant}_bs{batch}_{precision}"
                p, f = median(runs["plain"]), median(runs["folded"])
                figures[f"{key}_plain_ms"] = round(1000 * p, 3)
                figures[f"{key}_folded_ms"] = round(1000 * f, 3)
                figures[f"{key}_folded_speedup"] = round(p / f, 3)
                figures[f"{key}_max_abs_diff"] = float(f"{diff:.3g}")
                print(
                    f"{key:<28} plain {1000 * p:7.2f} ms  folded {1000 * f:7.2f} ms  "
                    f"x{p / f:.2f}  max |diff| {diff:.2g}",
                    flush=True,
                )
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_figures("inference", figures, args.quick)


if __name__ == "__main__":
    main()
