"""Budget matching: resize a trial's stage widths so its model costs what the base recipe's does.

A search over ``model.scales`` (or depths) compares models of different sizes unless something
holds the budget still: at ``bottleneck_ratio`` 1.0 a plain block (scales=1) has ~3x the
parameters of a Res2Net block with scales=4. With ``search.match: params`` (or ``flops``) every
trial's stage widths are multiplied by one factor, found by bisection, and then each stage is
snapped to a width its blocks accept (the 3x3 path must split evenly into ``scales`` groups);
the snapped neighbours around the factor are tried and the closest to the target wins. A model
that cannot come within the tolerance is refused with the closest figure it reached.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from scalelab.config.specs import ModelSpec

Match = Literal["params", "flops"]
TOLERANCE = 0.05  # a matched trial costs within +-5% of the target
_MAX_STAGES_EXHAUSTIVE = 5  # 2**stages snapped neighbours are tried up to this many stages


@dataclass(frozen=True)
class Matched:
    """The widths a trial gets, what they cost, and the target they were matched to."""

    widths: list[int]
    cost: int
    target: int

    @property
    def ratio(self) -> float:
        return self.cost / self.target

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1) <= TOLERANCE


def cost_function(
    kind: Match, in_chans: int, num_classes: int, image_size: int
) -> Callable[[ModelSpec], int]:
    """Parameters, or forward FLOPs per image, of the model a ModelSpec builds."""
    from scalelab.models.factory import build_model, count_flops, count_params

    def cost(spec: ModelSpec) -> int:
        model = build_model(spec, in_chans, num_classes, image_size)
        return count_params(model) if kind == "params" else count_flops(model, in_chans, image_size)

    return cost


def valid_width(spec: ModelSpec, width: int) -> bool:
    """A stage width whose 3x3 path splits evenly into ``spec.scales`` groups."""
    inner = spec.inner_width(width)
    return width >= 1 and inner >= spec.scales and inner % spec.scales == 0


def snapped(spec: ModelSpec, target: float) -> tuple[int, int]:
    """The nearest valid widths at or below and at or above ``target`` (equal when it is valid)."""
    low = max(1, math.floor(target))
    while low > 1 and not valid_width(spec, low):
        low -= 1
    high = max(1, math.ceil(target))
    while not valid_width(spec, high):
        high += 1
    if not valid_width(spec, low):  # nothing valid below: the smallest valid width stands for both
        low = high
    return low, high


def _nearest(spec: ModelSpec, target: float) -> int:
    low, high = snapped(spec, target)
    return low if target - low <= high - target else high


def match_widths(spec: ModelSpec, target: int, cost: Callable[[ModelSpec], int]) -> Matched:
    """Widths (base widths x one factor, each snapped) whose cost is closest to ``target``.

    Each cost is a model build (and a forward pass for FLOPs), so the factor is found in few
    steps: cost grows roughly with the square of the width, so the factor is first moved by
    sqrt(target / cost) (a few steps land within 1%), then bracketed and bisected in log space;
    last, every stage rounded down or up around the factor is tried.
    """
    base = list(spec.widths)
    seen: dict[tuple[int, ...], int] = {}

    def cost_of(widths: tuple[int, ...]) -> int:
        if widths not in seen:
            seen[widths] = cost(spec.model_copy(update={"widths": list(widths)}))
        return seen[widths]

    def at(log_factor: float) -> tuple[int, ...]:
        return tuple(_nearest(spec, w * math.exp(log_factor)) for w in base)

    def off(widths: tuple[int, ...]) -> float:
        return abs(cost_of(widths) / target - 1)

    lo, hi, x = -math.inf, math.inf, 0.0
    for _ in range(12):
        c = cost_of(at(x))
        if off(at(x)) <= TOLERANCE / 5:
            break
        if c < target:
            lo = max(lo, x)
        else:
            hi = min(hi, x)
        step = 0.5 * math.log(target / c)  # the square law's guess, kept inside the bracket
        nxt = x + step
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else x + 2 * step
        if at(nxt) == at(x):
            break
        x = nxt
    candidates = set(seen)
    if min(off(ws) for ws in candidates) > TOLERANCE / 5 and len(base) <= _MAX_STAGES_EXHAUSTIVE:
        candidates |= set(itertools.product(*(snapped(spec, w * math.exp(x)) for w in base)))
    best = min(candidates, key=lambda ws: (off(ws), ws))
    return Matched(list(best), cost_of(best), target)


def match_summary(matched: Matched, kind: Match) -> dict[str, Any]:
    """What the search table and the logs show of a match."""
    return {
        "matched_widths": matched.widths,
        f"matched_{kind}": matched.cost,
        "match_target": matched.target,
        "match_ratio": round(matched.ratio, 4),
    }
