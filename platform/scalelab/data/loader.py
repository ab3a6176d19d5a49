"""In-memory tensor loading: sharded like DistributedSampler, normalised and augmented on tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from scalelab.artifacts.preprocess import normalise_tensor, pixel_scale
from scalelab.config.specs import AugmentSpec
from scalelab.data.dataset import Split
from scalelab.data.resolution import random_rescale


class _IndexSet(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class TensorLoader:
    """Yields ``(x, y)`` batches: x float (B, C, H, W) normalised, y int64 (B,).

    Images stay uint8 in memory (4x smaller than float) and are converted per batch. Training
    indices come from ``DistributedSampler``, so N workers see disjoint shards of each epoch's
    shuffle (call ``set_epoch`` every epoch); evaluation (no shuffle) shards are strided and
    unpadded, so every sample is counted exactly once across ranks.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: list[float],
        std: list[float],
        *,
        shuffle: bool = False,
        augment: AugmentSpec | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        # a writable copy in (N, C, H, W) order (prepared arrays may be read-only)
        self.x = torch.from_numpy(np.array(split.x.transpose(0, 3, 1, 2), order="C"))
        self.y = torch.from_numpy(split.y.astype(np.int64))
        self.batch_size = batch_size
        self.augment = augment if shuffle else None
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.skip_batches = 0  # batches of this epoch already consumed (resume, see start_at)
        self.mean, self.std = pixel_scale(mean, std)  # (1, C, 1, 1) each, in uint8 units
        self.sampler = DistributedSampler(
            _IndexSet(len(self.y)),
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last and world_size > 1,
        )
        self.generator = torch.Generator().manual_seed(seed + 7919 * rank)
        if self.device.type == "cuda":  # small datasets live on the GPU: no per-batch host copies
            self.x, self.y = self.x.to(self.device), self.y.to(self.device)
            self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.sampler.seed + 7919 * self.sampler.rank + epoch)
        self.skip_batches = 0

    def start_at(self, consumed: int) -> None:
        """Resume the current epoch after ``consumed`` samples of this rank: the epoch's order is a
        function of (seed, epoch), so the rest of it is exactly what an uninterrupted run would see."""
        if consumed % self.batch_size:
            raise ValueError(
                f"resume position {consumed} is not a whole number of batches of {self.batch_size}"
            )
        self.skip_batches = consumed // self.batch_size

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch."""
        if self.sampler.shuffle or self.drop_last:
            return torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        # evaluation: a strided shard without padding. DistributedSampler would repeat samples
        # to even out the shards, and summed metrics would count them twice.
        return torch.arange(self.sampler.rank, len(self.y), self.sampler.num_replicas)

    def __len__(self) -> int:
        if self.sampler.shuffle or self.drop_last:
            n = self.sampler.num_samples
        else:
            n = len(range(self.sampler.rank, len(self.y), self.sampler.num_replicas))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self.indices().to(self.x.device)
        for b in range(self.skip_batches, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.x[sel].float()
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            x = normalise_tensor(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.to(self.device, non_blocking=True), self.y[sel].to(self.device, non_blocking=True)


def allowed_augment(aug: AugmentSpec | None, hflip_ok: bool) -> AugmentSpec | None:
    """The recipe's augmentation minus what the dataset forbids (no flips for digits: 2 vs 5)."""
    if aug is None or hflip_ok or not aug.hflip:
        return aug
    return aug.model_copy(update={"hflip": False})


def augment_batch(x: torch.Tensor, aug: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Resolution mix, random crop with padding, horizontal flip, random erasing, on a float batch
    (B, C, H, W)."""
    b, _, h, w = x.shape
    dev = x.device
    if aug.rescale is not None:
        x = random_rescale(x, *aug.rescale, gen)
    if aug.crop_padding:
        p = aug.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(dev)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(dev)
        rows = (dy.view(b, 1) + torch.arange(h, device=dev).view(1, h)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=dev).view(1, w)).view(b, 1, 1, w)
        bidx = torch.arange(b, device=dev).view(b, 1, 1, 1)
        cidx = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = padded[bidx, cidx, rows, cols]
    if aug.hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if aug.random_erasing > 0:
        erase = (torch.rand(b, generator=gen) < aug.random_erasing).to(dev)
        eh = torch.randint(h // 4, h // 2 + 1, (b,), generator=gen)
        ew = torch.randint(w // 4, w // 2 + 1, (b,), generator=gen)
        y0 = (torch.rand(b, generator=gen) * (h - eh + 1)).long().to(dev)
        x0 = (torch.rand(b, generator=gen) * (w - ew + 1)).long().to(dev)
        eh, ew = eh.to(dev), ew.to(dev)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        box = (ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1))
        box = box & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1))
        mask = (box & erase.view(b, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
        x = x.masked_fill(mask, 0.0)
    return x
