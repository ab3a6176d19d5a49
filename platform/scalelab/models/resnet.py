"""One ResNet trunk with multi-scale blocks, and the multi-scale classifier head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.config.specs import ModelSpec
from scalelab.models.blocks import MultiScaleBottleneck


def make_stem(kind: str, in_chans: int, width: int) -> tuple[nn.Module, int]:
    """Return (stem, stride). 'small' keeps full resolution: 8x8 digits have no pixels to spare."""
    if kind == "small":
        stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        return stem, 1
    stem = nn.Sequential(
        nn.Conv2d(in_chans, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    return stem, 4


class PyramidStem(nn.Module):
    """Multi-resolution stem: the image and its half-size pyramid level, fused by addition.

    The full-size image goes through the usual stem; the half-size level (2x2 average pool) through
    a 3x3 conv + BN + ReLU of its own, resized (bilinear) to the stem's output and added. At low
    resolution the half-size branch sees coarse shapes that a blurred full-size image still has.
    """

    def __init__(self, stem: nn.Module, in_chans: int, width: int) -> None:
        super().__init__()
        self.full = stem
        self.coarse = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.full(x)  # (B, width, H/r, W/r)
        half = self.coarse(F.avg_pool2d(x, 2, ceil_mode=True))  # (B, width, H/2, W/2)
        if half.shape[-2:] != full.shape[-2:]:
            half = F.interpolate(half, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return full + half


class MultiScaleHead(nn.Module):
    """Classifiers on several stages, fused.

    - ``last``: the last stage's classifier; side classifiers on other head stages are auxiliary.
    - ``mean_logits``: the mean of per-stage logits (each also gets an auxiliary loss).
    - ``concat``: one classifier over concatenated pooled features; per-stage ones are auxiliary.
    - ``weighted``: per-stage logits fused with learned softmax weights (``fusion_logits``, one per
      head stage, zero at start: the mean); each stage also gets an auxiliary loss.
    """

    def __init__(
        self, stage_chs: list[int], stages: list[int], fusion: str, num_classes: int, drop_rate: float
    ) -> None:
        super().__init__()
        n = len(stage_chs)
        self.stages = sorted({s % n for s in stages} | ({n - 1} if fusion == "last" else set()))
        self.fusion = fusion
        self.drop = nn.Dropout(drop_rate)
        self.side = nn.ModuleList(nn.Linear(stage_chs[s], num_classes) for s in self.stages)
        self.fused = (
            nn.Linear(sum(stage_chs[s] for s in self.stages), num_classes) if fusion == "concat" else None
        )
        self.fusion_logits = nn.Parameter(torch.zeros(len(self.stages))) if fusion == "weighted" else None

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = [self.drop(feats[s].mean((2, 3))) for s in self.stages]  # each (B, C_s)
        side = [fc(p) for fc, p in zip(self.side, pooled, strict=True)]  # each (B, K)
        if self.fusion == "concat":
            return self.fused(torch.cat(pooled, 1)), side
        if self.fusion == "mean_logits":
            return torch.stack(side).mean(0), side
        if self.fusion == "weighted":
            weights = torch.softmax(self.fusion_logits, 0).to(side[0].dtype)  # (S,)
            return torch.einsum("s,sbk->bk", weights, torch.stack(side)), side
        return side[-1], side[:-1]  # 'last': the last stage is the output, the rest are auxiliary


class MultiScaleResNet(nn.Module):
    """Stem -> stages of multi-scale bottlenecks -> multi-scale head.

    ``forward`` returns fused logits (B, K) (and the auxiliary logits with ``with_aux=True``);
    ``forward_features`` returns one feature map per stage, described by ``feature_info``.
    """

    def __init__(self, spec: ModelSpec, in_chans: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.spec = spec
        stem_kind = spec.stem if spec.stem != "auto" else ("small" if image_size < 64 else "large")
        self.stem, reduction = make_stem(stem_kind, in_chans, spec.stem_width)
        if spec.pyramid_stem:
            self.stem = PyramidStem(self.stem, in_chans, spec.stem_width)
        chs = spec.stem_width
        stages = []
        self.feature_info: list[dict] = []
        for i, (depth, width) in enumerate(zip(spec.depths, spec.widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for b in range(depth):
                blocks.append(
                    MultiScaleBottleneck(
                        chs,
                        width,
                        spec.inner_width(width),
                        stride=stride if b == 0 else 1,
                        scales=spec.scales,
                        kernel_sizes=tuple(spec.kernel_sizes),
                        se=spec.se,
                        se_ratio=spec.se_ratio,
                        depthwise=spec.depthwise,
                        dilations=spec.split_dilations(),
                    )
                )
                chs = width
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size  # chose the stem when spec.stem is 'auto'
        self.head = MultiScaleHead(
            [f["num_chs"] for f in self.feature_info],
            spec.head_stages,
            spec.head,
            num_classes,
            spec.drop_rate,
        )
        self.aux_weight = spec.aux_weight

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # (B, stem_width, H/r, W/r)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """Fused logits (B, K); with ``with_aux`` also the auxiliary logits (deep supervision).

        With ``test_time_flip`` an eval-mode call also runs the mirror images (in the same batch)
        and returns the mean of both logits; training is unchanged.
        """
        if self.spec.test_time_flip and not self.training:
            n = x.shape[0]
            logits, aux = self.head(self.forward_features(torch.cat([x, x.flip(-1)])))
            logits = (logits[:n] + logits[n:]) / 2
            aux = [(a[:n] + a[n:]) / 2 for a in aux]
        else:
            logits, aux = self.head(self.forward_features(x))
        return (logits, aux) if with_aux else logits


def classification_loss(
    outputs: tuple[torch.Tensor, list[torch.Tensor]],
    y: torch.Tensor,
    aux_weight: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the fused logits plus ``aux_weight`` x mean auxiliary cross-entropy."""
    logits, aux = outputs
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if aux:  # even at weight 0, so DDP sees a gradient for every parameter
        aux_loss = torch.stack([F.cross_entropy(a.float(), y, label_smoothing=label_smoothing) for a in aux])
        loss = loss + aux_weight * aux_loss.mean()
    return loss
