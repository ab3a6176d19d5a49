"""Detection on the multi-scale backbone: FPN from ``feature_info``, anchor-free centre head, NMS.

The head is CenterNet-style on one level (the finest FPN level, stride 4 with the 'large' stem):
a class heatmap of object centres and, at each location, the distances (left, top, right, bottom)
to the box edges (TTFNet's GIoU-regressed variant of CenterNet, which trains several times faster
than width/height regression). On 64-128 px scenes one stride-4 map is 16-32 cells a side, cheap on
CPU, and the top-down FPN brings the deeper stages' context into it, so there is no per-level
assignment to tune. Decoding takes 3x3 heatmap peaks, then class-wise NMS removes what duplicates
remain. ``torchvision`` is not a dependency, so box IoU and NMS are written here in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scalelab.config.specs import ModelSpec
from scalelab.models.resnet import MultiScaleResNet

HEATMAP_PRIOR = 0.05  # initial centre probability: keeps the focal loss calm in the first steps


class FPN(nn.Module):
    """Top-down feature pyramid over the chosen backbone stages, fused into the finest one.

    Lateral 1x1 convs bring each stage (channels from ``feature_info``) to ``width``; each coarser
    map is upsampled to the next finer one's size and added; a 3x3 conv smooths the finest sum.
    ``fusion="weighted"``: each merge is a learned convex combination instead of a sum (softmax over
    two scalars per merge, zero at start: equal halves), so training can lean the finest map on the
    fine lateral (small objects) or on the coarser context.
    """

    def __init__(
        self, feature_info: list[dict[str, Any]], levels: list[int], width: int, fusion: str = "sum"
    ) -> None:
        super().__init__()
        self.levels = sorted(set(levels))  # stage indices into feature_info, >= 0
        self.lateral = nn.ModuleList(nn.Conv2d(feature_info[i]["num_chs"], width, 1) for i in self.levels)
        merges = len(self.levels) - 1
        # (merges, 2) logits: [lateral, upsampled coarser]; None with one level or plain sums
        self.fusion_logits = (
            nn.Parameter(torch.zeros(merges, 2)) if fusion == "weighted" and merges > 0 else None
        )
        self.smooth = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.reduction = feature_info[self.levels[0]]["reduction"]
        self.out_chs = width

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [
            conv(feats[i]) for conv, i in zip(self.lateral, self.levels, strict=True)
        ]  # each (B, W, H_i, W_i)
        top = laterals[-1]
        for j, lat in enumerate(reversed(laterals[:-1])):
            # size=, not scale_factor=2: odd sizes round up at each stride-2 stage
            up = F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            if self.fusion_logits is None:
                top = lat + up
            else:
                w = self.fusion_logits[j].softmax(0)  # (2,): [lateral, coarser]
                top = w[0] * lat + w[1] * up
        return self.smooth(top)  # (B, width, H / reduction, W / reduction)


class CenterHead(nn.Module):
    """Shared 3x3 tower, then a class heatmap (K logits) and 4 edge distances per location."""

    def __init__(self, in_chs: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.tower = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, padding=1, bias=False), nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True)
        )
        self.heatmap = nn.Conv2d(in_chs, num_classes, 1)
        self.box = nn.Conv2d(in_chs, 4, 1)
        nn.init.constant_(self.heatmap.bias, float(np.log(HEATMAP_PRIOR / (1 - HEATMAP_PRIOR))))
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.constant_(self.box.bias, 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tower(x)
        # distances in pixels: softplus keeps them positive with a gradient everywhere
        return self.heatmap(x), F.softplus(self.box(x)) * self.stride  # (B, K, h, w), (B, 4, h, w)


@dataclass
class DecodeConfig:
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 100


class Detector(nn.Module):
    """Backbone (its classifier head dropped) -> FPN -> centre head.

    ``forward`` returns raw maps ``(heatmap_logits (B, K, h, w), ltrb (B, 4, h, w))``, pure tensor
    ops (exportable); ``predict`` decodes them into boxes in input pixels.
    """

    def __init__(self, spec: ModelSpec, in_chans: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.backbone = MultiScaleResNet(
            spec, in_chans=in_chans, num_classes=num_classes, image_size=image_size
        )
        # detection reads forward_features only: drop the classifier and any stage deeper than the
        # deepest FPN level, so every parameter gets a gradient (DDP requires it)
        n = len(self.backbone.feature_info)
        levels = sorted({lvl % n for lvl in spec.fpn_levels})  # negative indices count from the end
        self.backbone.head = nn.Identity()
        self.backbone.stages = self.backbone.stages[: levels[-1] + 1]
        self.feature_info = self.backbone.feature_info[: levels[-1] + 1]
        self.fpn = FPN(self.feature_info, levels, spec.fpn_width, spec.fpn_fusion)
        self.stride = self.fpn.reduction
        self.head = CenterHead(spec.fpn_width, num_classes, self.stride)
        self.decode_config = DecodeConfig()

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``with_aux`` is accepted for the training loop's uniform call; detection has no aux heads."""
        return self.head(self.fpn(self.forward_features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (n, 4) xyxy in input pixels, ``scores`` (n,), ``labels`` (n,)."""
        heatmap, ltrb = self(x)
        return decode(heatmap.float(), ltrb.float(), self.stride, self.decode_config)


def build_detector(spec: ModelSpec, in_chans: int, num_classes: int, image_size: int) -> Detector:
    return Detector(spec, in_chans, num_classes, image_size)


def cell_centres(h: int, w: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """(h, w, 2) pixel coordinates (x, y) of the centre of each output cell."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def ltrb_to_boxes(ltrb: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 4, h, w) distances -> (B, h, w, 4) xyxy boxes in pixels."""
    b, _, h, w = ltrb.shape
    c = cell_centres(h, w, stride, ltrb.device)  # (h, w, 2)
    d = ltrb.permute(0, 2, 3, 1)  # (B, h, w, 4)
    return torch.cat([c - d[..., :2], c + d[..., 2:]], dim=-1)


def decode(
    heatmap_logits: torch.Tensor, ltrb: torch.Tensor, stride: int, cfg: DecodeConfig | None = None
) -> list[dict[str, torch.Tensor]]:
    """Heatmap peaks (3x3 local maxima) -> top-k -> score threshold -> class-wise NMS."""
    cfg = cfg or DecodeConfig()
    heat = heatmap_logits.sigmoid()
    b, k, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, idx = peaks.reshape(b, -1).topk(min(cfg.max_detections, k * h * w))  # (B, topk)
    labels = idx // (h * w)
    cells = idx % (h * w)
    boxes = ltrb_to_boxes(ltrb, stride).reshape(b, h * w, 4)
    out = []
    for i in range(b):
        keep = scores[i] > cfg.score_threshold
        bx = boxes[i, cells[i][keep]]
        sc, lb = scores[i][keep], labels[i][keep]
        kept = batched_nms(bx, sc, lb, cfg.iou_threshold)
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, highest score first (torchvision.ops.nms semantics)."""
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    iou = box_iou(boxes[order], boxes[order]).cpu().numpy()  # (n, n): n <= max_detections, small
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[i + 1 :] |= iou[i, i + 1 :] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class only: boxes of different classes are shifted apart so never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)
