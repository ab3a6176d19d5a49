"""Resolution changes on image batches: the mixed-resolution training augmentation and the
test-time rescaling of the low-resolution benchmark use the same resampling.

``rescale_images(x, s)`` keeps the input size (B, C, H, W):
- s < 1: downsample to round(s*H) x round(s*W) (area averaging, as a low-resolution camera would
  integrate) and resize back up (bilinear): the same object at less resolution;
- s > 1: upsample (bilinear) and centre-crop back to H x W: the object appears s times larger;
- s == 1: unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rescale_images(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Float batch (B, C, H, W) at another resolution, same size; see the module doc."""
    h, w = x.shape[-2:]
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    if (th, tw) == (h, w):
        return x
    if scale < 1:
        small = F.interpolate(x, size=(th, tw), mode="area")
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    big = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    top, left = (th - h) // 2, (tw - w) // 2
    return big[..., top : top + h, left : left + w]


def random_rescale(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """Each image rescaled by its own factor drawn uniformly from [low, high] (mixed-resolution
    training). Images are grouped by the size their factor rounds to, so each group is one call."""
    b, h = x.shape[0], x.shape[-2]
    factors = low + (high - low) * torch.rand(b, generator=gen)
    sizes = torch.clamp(torch.round(factors * h), min=1).long()  # (B,) the side each image passes through
    out = x.clone()
    for size in sizes.unique().tolist():
        if size == h:
            continue
        sel = (sizes == size).nonzero().flatten().to(x.device)
        out[sel] = rescale_images(x[sel], size / h)
    return out
