"""TensorLoader: disjoint shards per rank, seeded epochs, normalisation, augmentation on tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalelab.config.specs import AugmentSpec
from scalelab.data.dataset import Split
from scalelab.data.loader import TensorLoader, allowed_augment, augment_batch


def split(n: int = 103, size: int = 8, channels: int = 1) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), np.arange(n) % 5)


def labels_seen(loader: TensorLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(v) for _, y in loader for v in y]


@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_are_disjoint_and_reshuffled(world_size: int):
    s = Split(np.zeros((103, 4, 4, 1), np.uint8), np.arange(103))  # label = sample index
    loaders = [
        TensorLoader(
            s, 10, [0.5], [0.25], shuffle=True, seed=1, rank=r, world_size=world_size, drop_last=True
        )
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        shards = [labels_seen(ld, epoch) for ld in loaders]
        assert len({len(sh) for sh in shards}) == 1  # equal steps per rank: DDP needs it
        seen = [v for sh in shards for v in sh]
        assert len(seen) == len(set(seen))  # no sample on two ranks
    assert labels_seen(loaders[0], 0) != labels_seen(loaders[0], 1)  # reshuffled per epoch
    assert labels_seen(loaders[0], 1) == labels_seen(loaders[0], 1)  # and reproducible


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_shards_cover_every_sample_exactly_once(world_size: int):
    s = Split(np.zeros((103, 4, 4, 1), np.uint8), np.arange(103))
    seen = [
        v
        for r in range(world_size)
        for v in labels_seen(TensorLoader(s, 16, [0.5], [0.25], rank=r, world_size=world_size), 0)
    ]
    assert sorted(seen) == list(range(103))


def test_batches_are_normalised_float_nchw():
    s = split(channels=3)
    mean = (s.x.reshape(-1, 3) / 255).mean(0).tolist()
    std = (s.x.reshape(-1, 3) / 255).std(0).tolist()
    loader = TensorLoader(s, 32, mean, std)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    full = torch.cat([b for b, _ in loader])
    assert full.mean().abs() < 0.05 and (full.std() - 1).abs() < 0.05
    assert len(loader) == 4 and sum(len(b) for b, _ in loader) == len(s)


def test_drop_last_and_channels_last():
    loader = TensorLoader(split(), 10, [0.5], [0.2], shuffle=True, drop_last=True, channels_last=True)
    batches = list(loader)
    assert len(batches) == 10 and all(len(y) == 10 for _, y in batches)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_augment_keeps_shape_and_changes_pixels():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, AugmentSpec(crop_padding=2, hflip=True, random_erasing=1.0), gen)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert (out == 0).any()  # padding / erasing put zeros in


def test_hflip_is_dropped_where_the_dataset_forbids_it():
    aug = AugmentSpec(crop_padding=1, hflip=True)
    assert allowed_augment(aug, hflip_ok=False).hflip is False
    assert allowed_augment(aug, hflip_ok=False).crop_padding == 1
    assert allowed_augment(aug, hflip_ok=True) is aug
    assert allowed_augment(None, hflip_ok=False) is None


def test_fit_never_flips_digits(workdir, monkeypatch):
    """fit passes the dataset-filtered augmentation to the loader (digits: hflip_ok=False)."""
    from scalelab.config import load_recipe
    from scalelab.data import load_dataset
    from scalelab.train import loop

    seen = []
    real = loop.TensorLoader

    def spy(split, batch, *a, augment=None, **kw):
        seen.append(augment)
        return real(split, batch, *a, augment=augment, **kw)

    monkeypatch.setattr(loop, "TensorLoader", spy)
    spec = load_recipe(
        "pipelines/digits.yaml",
        ["model.variant=msresnet_tiny", "train.epochs=1", "data.augment.hflip=true", "train.threads=1"],
    )
    loop.fit(spec, load_dataset(spec.data))
    assert seen[0] is not None and seen[0].hflip is False
