"""Detection training targets and loss (TTFNet, a CenterNet that trains fast).

Each object puts a Gaussian on the class heatmap at its centre cell (sigma from its size) and
supervises the box distances at the cells around its centre, weighted by that Gaussian, with a
GIoU loss. Part of the model family, as ``classification_loss`` is: training and evaluation of
a bundle compute the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalelab.models.detection import box_area, ltrb_to_boxes

GAUSSIAN_ALPHA = 0.54  # TTFNet: sigma = alpha * side / 6 (heatmap and regression area)
MIN_SIGMA = 0.3  # cells; a 6 px object at stride 4 still gets a (narrow) Gaussian
BOX_WEIGHT = 5.0  # TTFNet's weight of the GIoU term against the heatmap focal loss
REGRESSION_FLOOR = 0.05  # cells whose Gaussian is below this do not regress the box


@dataclass
class BoxTargets:
    """The boxes of one batch: per image ``boxes`` (m_i, 4) xyxy px and ``labels`` (m_i,)."""

    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_ids: torch.Tensor  # (B,) index of each image in its split (unique across workers)
    image_size: int

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BoxTargets:
        """The same targets with boxes and labels on ``device`` (image ids stay on the CPU)."""
        return BoxTargets(
            [b.to(device, non_blocking=non_blocking) for b in self.boxes],
            [lab.to(device, non_blocking=non_blocking) for lab in self.labels],
            self.image_ids,
            self.image_size,
        )


def encode_targets(
    targets: BoxTargets, num_classes: int, h: int, w: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmap (B, K, h, w), box target per cell (B, h, w, 4), regression weight (B, h, w).

    Each object's regression weights sum to 1, so small objects count as much as large ones;
    where objects' areas overlap the smaller object owns the cell.
    """
    b = len(targets)
    dev = targets.boxes[0].device if b else torch.device("cpu")
    heat = torch.zeros(b * num_classes, h, w, device=dev)
    box_t = torch.zeros(b, h, w, 4, device=dev)
    weight = torch.zeros(b, h, w, device=dev)
    counts = [len(x) for x in targets.boxes]
    if not sum(counts):
        return heat.view(b, num_classes, h, w), box_t, weight
    boxes = torch.cat(targets.boxes).float()  # (M, 4)
    labels = torch.cat(targets.labels).long()
    owner = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(counts, device=dev))
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2) px
    peak = (centre / stride).floor().long()
    peak[:, 0].clamp_(0, w - 1)
    peak[:, 1].clamp_(0, h - 1)
    sigma = ((boxes[:, 2:] - boxes[:, :2]) * GAUSSIAN_ALPHA / 6 / stride).clamp(min=MIN_SIGMA)  # (M, 2)
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    dx = (xs - peak[:, 0].view(-1, 1, 1)) / sigma[:, 0].view(-1, 1, 1)
    dy = (ys - peak[:, 1].view(-1, 1, 1)) / sigma[:, 1].view(-1, 1, 1)
    gauss = torch.exp(-(dx**2 + dy**2) / 2)  # (M, h, w), exactly 1 at each peak
    heat.scatter_reduce_(0, (owner * num_classes + labels).view(-1, 1, 1).expand_as(gauss), gauss, "amax")

    cx = (xs + 0.5) * stride
    cy = (ys + 0.5) * stride
    inside_x = (cx > boxes[:, 0:1, None]) & (cx < boxes[:, 2:3, None])  # (M, 1, w)
    inside = inside_x & (cy > boxes[:, 1:2, None]) & (cy < boxes[:, 3:4, None])  # (M, h, w)
    region = (inside & (gauss > REGRESSION_FLOOR)) | (gauss == 1)  # the peak cell always regresses
    area = box_area(boxes)
    cost = torch.where(region, area.view(-1, 1, 1), torch.full_like(gauss, float("inf")))
    smallest = torch.full((b, h, w), float("inf"), device=dev)
    smallest.scatter_reduce_(0, owner.view(-1, 1, 1).expand_as(cost), cost, "amin")
    owned = region & (cost == smallest[owner])
    w_obj = gauss * owned
    w_obj = w_obj / w_obj.sum((1, 2), keepdim=True).clamp(min=1e-9)
    m, yy, xx = owned.nonzero(as_tuple=True)
    box_t[owner[m], yy, xx] = boxes[m]
    weight[owner[m], yy, xx] = w_obj[m, yy, xx]
    return heat.view(b, num_classes, h, w), box_t, weight


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed (normalise by the object count)."""
    pos = target == 1
    pos_loss = F.logsigmoid(logits) * (1 - logits.sigmoid()) ** 2
    neg_loss = F.logsigmoid(-logits) * logits.sigmoid() ** 2 * (1 - target) ** 4
    return -(pos_loss[pos].sum() + neg_loss[~pos].sum())


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU of matched xyxy boxes (n, 4) -> (n,)."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1)
    return 1 - (iou - (hull - union) / hull.clamp(min=1e-6))


def detection_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: BoxTargets) -> torch.Tensor:
    """Heatmap focal loss + ``BOX_WEIGHT`` x weighted GIoU, both per object."""
    heatmap, ltrb = outputs[0].float(), outputs[1].float()  # (B, K, h, w), (B, 4, h, w)
    _, k, h, w = heatmap.shape
    stride = max(1, round(targets.image_size / h))
    heat_t, box_t, weight = encode_targets(targets, k, h, w, stride)
    n_obj = max(1, sum(len(b) for b in targets.boxes))
    pos = weight > 0
    pred = ltrb_to_boxes(ltrb, stride)[pos]  # (P, 4)
    box_loss = (giou_loss(pred, box_t[pos]) * weight[pos]).sum()
    # ltrb.sum() * 0: the box head always joins the graph (DDP needs a gradient for every parameter)
    return (focal_loss(heatmap, heat_t) + BOX_WEIGHT * box_loss) / n_obj + ltrb.sum() * 0
