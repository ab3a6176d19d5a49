"""The multi-scale ResNet family: blocks, trunk, heads, factory (variants: scalelab.config.variants)."""

from scalelab.config.variants import list_models, register_model, variant_config
from scalelab.models.factory import build_model, count_flops, count_params, create_model
from scalelab.models.resnet import MultiScaleHead, MultiScaleResNet, classification_loss

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
