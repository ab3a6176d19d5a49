"""The registered model family: each variant is a name and a config (a few fields of ModelSpec).

Variants are named configurations, so they live with the configuration: ``ModelSpec`` starts from
``model.variant`` when it validates, without importing the models package (which builds the
networks). ``scalelab.models`` re-exports :func:`list_models` and :func:`variant_config`.

Baselines (``scales=1``) are sized to match their multi-scale partner's parameter count within a
few percent, so comparisons are fair; ``tests/unit/test_models.py`` checks the match.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

_VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_model(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Decorator: the function's name is the variant name, its return value the config."""
    if fn.__name__ in _VARIANTS:
        raise ValueError(f"model variant {fn.__name__!r} is registered twice")
    _VARIANTS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    names = sorted(n for n in _VARIANTS if fnmatch.fnmatch(n, pattern))
    if task is not None:
        names = [n for n in names if _VARIANTS[n]().get("task", "classification") == task]
    return names


def variant_config(name: str) -> dict[str, Any]:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; known: {', '.join(sorted(_VARIANTS))}")
    return {"variant": name, **_VARIANTS[name]()}


# ------------------------------------------------------------------ classification


@register_model
def msresnet_tiny():
    """Smallest multi-scale model, for tests and smoke runs."""
    return dict(depths=[1, 1, 1], widths=[32, 64, 128], stem_width=16, scales=4, bottleneck_ratio=0.5)


@register_model
def resnet_tiny():
    """Plain bottleneck ResNet partner of msresnet_tiny (matched parameters)."""
    return dict(depths=[1, 1, 1], widths=[32, 64, 128], stem_width=16, scales=1, bottleneck_ratio=0.28125)


@register_model
def msresnet_s():
    """Default for small images (digits, 8-32 px): 3 stages, Res2Net scales=4, mean-logit head."""
    return dict(depths=[2, 2, 2], widths=[64, 128, 256], stem_width=32, scales=4, bottleneck_ratio=1.0)


@register_model
def resnet_s():
    """Plain bottleneck ResNet partner of msresnet_s (scales=1, matched parameters)."""
    return dict(depths=[2, 2, 2], widths=[64, 128, 256], stem_width=32, scales=1, bottleneck_ratio=0.53125)


@register_model
def msresnet_s_se():
    """msresnet_s with squeeze-and-excitation in every block."""
    return dict(msresnet_s(), se=True)


@register_model
def msresnet_s_dw():
    """msresnet_s with depthwise-separable split convolutions (fewer FLOPs)."""
    return dict(msresnet_s(), depthwise=True)


@register_model
def msresnet_s_mixk():
    """msresnet_s with mixed 3x3 / 5x5 kernels across the splits."""
    return dict(msresnet_s(), kernel_sizes=[3, 5])


@register_model
def msresnet_m():
    """Fashion-MNIST-sized (28 px) model, under 1M parameters, concatenated multi-scale head."""
    return dict(
        depths=[2, 2, 2],
        widths=[64, 128, 256],
        stem_width=32,
        scales=4,
        bottleneck_ratio=1.0,
        head="concat",
        head_stages=[-2, -1],
    )


@register_model
def resnet_m():
    """Plain partner of msresnet_m (scales=1, matched parameters)."""
    return dict(
        depths=[2, 2, 2],
        widths=[64, 128, 256],
        stem_width=32,
        scales=1,
        bottleneck_ratio=0.53125,
        head="concat",
        head_stages=[-2, -1],
    )


@register_model
def msresnet_l():
    """For large images (>= 64 px): ImageNet-style stem, four stages."""
    return dict(
        stem="large",
        depths=[2, 2, 2, 2],
        widths=[64, 128, 256, 512],
        stem_width=32,
        scales=4,
        bottleneck_ratio=0.5,
        head="mean_logits",
        head_stages=[-2, -1],
    )


# ------------------------------------------------------------------ detection (FPN + centre head)


@register_model
def msdet_s():
    """Detector for 64-128 px scenes: stride-4 'large' stem, 3 multi-scale stages, FPN width 64."""
    return dict(
        task="detection",
        stem="large",
        depths=[2, 2, 2],
        widths=[32, 64, 128],
        stem_width=32,
        scales=4,
        bottleneck_ratio=0.5,
        fpn_width=64,
        fpn_levels=[0, 1, 2],
    )


@register_model
def det_s_baseline():
    """Plain-bottleneck partner of msdet_s (scales=1, matched parameters)."""
    return dict(msdet_s(), scales=1, bottleneck_ratio=0.3)
