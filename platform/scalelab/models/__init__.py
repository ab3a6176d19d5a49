"""The multi-scale ResNet family: blocks, trunk, heads, registry, factory.

The names below are loaded on first use (PEP 562), so the registry of variants (names and
configs, no torch) can be read without importing torch: `scalelab models variants` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "build_model": "factory",
    "count_flops": "factory",
    "count_params": "factory",
    "create_model": "factory",
    "list_models": "registry",
    "register_model": "registry",
    "variant_config": "registry",
    "MultiScaleHead": "resnet",
    "MultiScaleResNet": "resnet",
    "classification_loss": "resnet",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'scalelab.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scalelab.models.{_WHERE[name]}"), name)
