"""Loader throughput vs the model's training-step throughput: the loader must not be the bottleneck.

Measures, in one process on the same threads as training:
- digits: TensorLoader over the training split (batch 128, as pipelines/digits.yaml: no augmentation);
- Fashion-MNIST: the same with the recipe's augmentation (batch 256, crop+pad 2, hflip, erasing);
- one training step of msresnet_m (the Fashion-MNIST model) on 28x28 batches of 256, with the
  runtime training would pick (bf16 autocast + channels_last where the CPU supports it).

Both loaders produce normalised float batches in the memory format training uses. Medians of
several repeats; ``loader_to_train_ratio`` >= 10 means the loader costs under 10% of a step.

    .venv/bin/python benchmarks/loader.py [--repeats 3] [--fashion /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_results  # noqa: E402
from scalelab.config import validate_recipe  # noqa: E402
from scalelab.data import read_raw  # noqa: E402
from scalelab.data.dataset import Dataset  # noqa: E402
from scalelab.data.loader import TensorLoader, allowed_augment  # noqa: E402
from scalelab.errors import DataError  # noqa: E402
from scalelab.models import build_model  # noqa: E402
from scalelab.models.resnet import classification_loss  # noqa: E402
from scalelab.train.loop import build_optimizer  # noqa: E402
from scalelab.train.runtime import select_runtime  # noqa: E402


def loader_images_per_s(data: Dataset, spec, batch: int, repeats: int, channels_last: bool) -> float:
    """Images/s of one full pass over the training split, median over ``repeats`` epochs."""
    loader = TensorLoader(
        data.splits["train"],
        batch,
        data.mean,
        data.std,
        shuffle=True,
        drop_last=True,
        augment=allowed_augment(spec.data.augment, data.hflip_ok),
        channels_last=channels_last,
    )
    rates = []
    for epoch in range(repeats + 1):
        loader.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += len(x)
        if epoch:  # the first pass warms the allocator
            rates.append(seen / (time.perf_counter() - start))
    return median(rates)


def train_step_images_per_s(spec, data: Dataset, batch: int, steps: int, repeats: int) -> tuple[float, str]:
    runtime = select_runtime(spec.train)
    model = build_model(spec.model, data.channels, data.num_classes, data.image_size)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(spec, model)
    loader = TensorLoader(
        data.splits["train"],
        batch,
        data.mean,
        data.std,
        shuffle=True,
        drop_last=True,
        channels_last=runtime.channels_last,
    )
    batches = [b for b, _ in zip(loader, range(steps), strict=False)]
    model.train()

    def step(x, y):
        with runtime.autocast():
            loss = classification_loss(model(x, with_aux=True), y, spec.model.aux_weight, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x, y in batches[:2]:  # warm-up: first steps allocate and pick kernels
        step(x, y)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
        rates.append(len(batches) * batch / (time.perf_counter() - start))
    return median(rates), runtime.precision


def main() -> None:
    refuse_while_stack_runs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed repeat")
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    digits_spec = validate_recipe({"name": "digits", "data": {"name": "digits", "kind": "digits"}})
    digits = read_raw(digits_spec.data)
    fashion_spec = validate_recipe(
        {
            "name": "fashion-mnist",
            "data": {
                "name": "fashion-mnist",
                "kind": "fashion-mnist",
                "source": args.fashion,
                "augment": {"crop_padding": 2, "hflip": True, "random_erasing": 0.1},
            },
            "model": {"variant": "msresnet_m"},
            "train": {"batch_size": 256, "lr": 0.2},
        }
    )
    channels_last = select_runtime(fashion_spec.train).channels_last
    figures: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats}

    figures["digits_images_per_s"] = loader_images_per_s(
        digits, digits_spec, 128, args.repeats, channels_last
    )
    print(f"digits loader: {figures['digits_images_per_s']:,.0f} img/s")
    try:
        fashion = read_raw(fashion_spec.data)
    except DataError as exc:  # the Debian package is a benchmark prerequisite, not a test one
        print(f"Fashion-MNIST unavailable ({exc}); using 28x28 digits-shaped stand-in for the train step")
        fashion = None
        figures["fashion_mnist_images_per_s"] = None
    if fashion is not None:
        figures["fashion_mnist_images_per_s"] = loader_images_per_s(
            fashion, fashion_spec, 256, max(1, args.repeats // 2), channels_last
        )
        print(f"fashion-mnist loader (augmented): {figures['fashion_mnist_images_per_s']:,.0f} img/s")

    step_data = (
        fashion
        if fashion is not None
        else read_raw(validate_recipe({"data": {"name": "digits", "kind": "digits", "image_size": 28}}).data)
    )
    rate, precision = train_step_images_per_s(fashion_spec, step_data, 256, args.steps, args.repeats)
    figures.update(
        train_step_images_per_s=rate,
        train_step_model="msresnet_m",
        train_step_batch=256,
        train_step_precision=precision,
    )
    print(f"msresnet_m train step ({precision}): {rate:,.0f} img/s")
    loader_rate = figures["fashion_mnist_images_per_s"] or figures["digits_images_per_s"]
    figures["loader_to_train_ratio"] = loader_rate / rate
    print(f"loader / train step: {figures['loader_to_train_ratio']:.1f}x")
    write_results("loader", figures)


if __name__ == "__main__":
    main()
