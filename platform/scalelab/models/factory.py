"""Building models, plus parameter and FLOP counts.

``create_model`` builds a registered variant by name (or a ModelSpec) with field overrides, for
people and tests; ``build_model`` builds a validated, resolved ModelSpec, which is what training
and bundle loading use. Every model is built by ``build_model`` in the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scalelab.config.specs import ModelSpec
from scalelab.models.resnet import MultiScaleResNet


def build_model(spec: ModelSpec, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    if spec.task == "detection":
        from scalelab.models.detection import build_detector

        return build_detector(spec, in_chans, num_classes, image_size)
    return MultiScaleResNet(spec, in_chans=in_chans, num_classes=num_classes, image_size=image_size)


def create_model(
    name: str | ModelSpec,
    in_chans: int = 1,
    num_classes: int = 10,
    image_size: int = 32,
    **overrides: Any,
) -> nn.Module:
    """Build a registered variant (``create_model("msresnet_s", scales=2)``) or a ModelSpec."""
    if isinstance(name, ModelSpec):
        spec = name.model_copy(update=overrides) if overrides else name
        spec = ModelSpec.model_validate(spec.model_dump())
    else:
        spec = ModelSpec.model_validate({"variant": name, **overrides})
    return build_model(spec, in_chans, num_classes, image_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, in_chans: int, image_size: int) -> int:
    """Forward FLOPs for one image (multiply-add = 2 FLOPs), measured by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
