"""The multi-scale ResNet family: blocks, trunk, heads, factory (variants: scalelab.config.variants).

The torch-backed names below load their module on first use (PEP 562), so that importing a light
part of the package (:mod:`scalelab.models.summary`) does not import torch: `scalelab models
variants` lists the family from a cache without it. Each of them lives in this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalelab import lazy_exports
from scalelab.config.variants import list_models, register_model, variant_config

if TYPE_CHECKING:
    from scalelab.models.factory import build_model, count_flops, count_params, create_model
    from scalelab.models.resnet import MultiScaleHead, MultiScaleResNet, classification_loss

_HOME = {
    "build_model": "factory",
    "count_flops": "factory",
    "count_params": "factory",
    "create_model": "factory",
    "MultiScaleHead": "resnet",
    "MultiScaleResNet": "resnet",
    "classification_loss": "resnet",
}

__all__ = [
    "MultiScaleHead",
    "MultiScaleResNet",
    "build_model",
    "classification_loss",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "register_model",
    "variant_config",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
