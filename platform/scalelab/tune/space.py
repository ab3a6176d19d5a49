"""The search space: dotted recipe keys -> distributions, checked before anything is launched.

A recipe's ``search.space`` maps dotted keys (``model.scales``, ``train.lr``) to a
:class:`ParamSpace`. This module validates it against :class:`RecipeSpec` (unknown keys, values a
recipe would refuse, combinations that never make a valid model), turns it into a Ray Tune param
space, applies a trial's config back onto the recipe, and screens configs against the compute
budget (``search.max_params`` / ``search.max_flops``) on the built model.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from scalelab.config.loader import set_dotted, validate_recipe
from scalelab.config.specs import ParamSpace, RecipeSpec, SearchSpec
from scalelab.errors import ConfigError

# Search-only keys that expand into recipe fields when a trial's config is applied.
BASE_WIDTH = "model.base_width"  # widths = [b, 2b, 4b, ...], one per stage of model.depths
ALIASES = {BASE_WIDTH: "stage widths doubling from this base width (sets model.widths)"}
# Not searched: the screen adds it to a trial's config under search.match (the widths that give
# the trial the base recipe's budget, JSON-encoded like other list values), set last.
MATCHED_WIDTHS = "match.widths"
WIDTH_KEYS = ("model.widths", BASE_WIDTH)
_SCALARS = (str, int, float, bool, type(None))
_MAX_COMBOS = 512  # combinations checked exhaustively before falling back to a seeded sample


def encoded(space: ParamSpace) -> bool:
    """Choices that are not scalars (lists such as depths) travel through Tune as JSON strings."""
    return space.choice is not None and not all(isinstance(v, _SCALARS) for v in space.choice)


def decode_value(space: ParamSpace, value: Any) -> Any:
    return json.loads(value) if encoded(space) and isinstance(value, str) else value


def decode_config(space: dict[str, ParamSpace], config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config (encoded choices, matched widths) -> the values as the recipe holds them."""
    values = {k: decode_value(space[k], v) for k, v in config.items() if k in space}
    if MATCHED_WIDTHS in config:
        widths = config[MATCHED_WIDTHS]
        values[MATCHED_WIDTHS] = json.loads(widths) if isinstance(widths, str) else widths
    return values


def resolve_match(search: SearchSpec) -> str:
    """``search.match`` as it applies: its default follows what the space searches."""
    if search.match is not None:
        return search.match
    space = search.space
    return "params" if "model.scales" in space and not any(k in space for k in WIDTH_KEYS) else "none"


def to_tune_space(space: dict[str, ParamSpace]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.choice is not None:
            values = [json.dumps(v) for v in dim.choice] if encoded(dim) else list(dim.choice)
            out[key] = tune.choice(values)
        elif dim.uniform is not None:
            out[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            out[key] = tune.loguniform(*dim.loguniform)
        else:
            out[key] = tune.randint(*dim.randint)
    return out


def apply_config(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Recipe dict with a trial's (decoded) values set; ``model.base_width`` expands last, and
    matched widths (``search.match``) replace the widths after that."""
    tree = copy.deepcopy(base)
    for key, value in config.items():
        if key not in ALIASES and key != MATCHED_WIDTHS:
            set_dotted(tree, key, value)
    if BASE_WIDTH in config:
        stages = len(tree.get("model", {}).get("depths") or RecipeSpec().model.depths)
        set_dotted(tree, "model.widths", [int(config[BASE_WIDTH]) * 2**i for i in range(stages)])
    if MATCHED_WIDTHS in config:
        set_dotted(tree, "model.widths", list(config[MATCHED_WIDTHS]))
    return tree


def field_for(key: str):
    """The pydantic field a dotted key names, or a ConfigError that lists what is allowed."""
    node: type[BaseModel] = RecipeSpec
    parts = key.split(".")
    if parts[0] == "search":
        raise ConfigError(f"search.space: key {key!r} cannot search the search section itself")
    for i, part in enumerate(parts):
        field = node.model_fields.get(part)
        where = ".".join(parts[:i]) or "the recipe"
        if field is None:
            allowed = sorted(node.model_fields)
            if i == 1 and parts[0] == "model":
                allowed += sorted(k.split(".", 1)[1] for k in ALIASES)
            raise ConfigError(
                f"search.space: unknown key {key!r}: {where} has no field {part!r}; "
                f"allowed there: {', '.join(allowed)}"
            )
        annotation = field.annotation
        last = i == len(parts) - 1
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if last:
            if is_section:
                raise ConfigError(
                    f"search.space: key {key!r} is a whole section; search one of its fields "
                    f"({', '.join(sorted(annotation.model_fields))})"
                )
            return field
        if not is_section:
            raise ConfigError(f"search.space: key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = annotation
    raise AssertionError("unreachable")


def _check_value(key: str, field, value: Any) -> None:
    adapter = TypeAdapter(
        Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    )
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"search.space.{key}: value {value!r} is not valid for {key}: {msg}") from None


def candidate_values(dim: ParamSpace) -> list[Any]:
    """Values that stand for a dimension when checking it: every choice, or the range's ends."""
    if dim.choice is not None:
        return list(dim.choice)
    if dim.randint is not None:
        return [dim.randint[0], dim.randint[1] - 1]
    return list(dim.uniform or dim.loguniform)


def validate_space(spec: RecipeSpec) -> None:
    """Raise ConfigError (naming the key) for anything that would fail only once trials run."""
    search = spec.search
    space = search.space
    if not space:
        raise ConfigError(
            "search.space is empty: give at least one dotted key with choice/uniform/loguniform/randint, "
            "e.g. search.space: {model.scales: {choice: [1, 2, 4]}}"
        )
    # Each dimension's own shape (one distribution, a non-empty choice, low < high) is checked
    # where it is declared, by ParamSpace, when the recipe loads; here: how it fits the recipe.
    for key, dim in space.items():
        if key in ALIASES:
            for v in candidate_values(dim):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"search.space.{key}: base width must be a positive integer, got {v!r}")
            if "model.widths" in space:
                raise ConfigError(f"search.space.{key}: search model.widths or {key}, not both")
            continue
        field = field_for(key)
        if (dim.uniform or dim.loguniform) and field.annotation is int:
            raise ConfigError(
                f"search.space.{key}: {key} is an integer; use randint or choice, not a float range"
            )
        for value in candidate_values(dim):
            _check_value(key, field, value)
    if search.algorithm == "grid" and not any(dim.choice is not None for dim in space.values()):
        raise ConfigError("search.algorithm 'grid' needs at least one key with choice values")
    searched_widths = [k for k in WIDTH_KEYS if k in space]
    if search.match not in (None, "none") and searched_widths:
        raise ConfigError(
            f"search.match={search.match!r} sets every trial's widths to hold the base budget, so "
            f"searching {searched_widths[0]} would be overridden; drop it from search.space or set "
            "search.match: none"
        )
    _check_combinations(spec)


def _check_combinations(spec: RecipeSpec) -> None:
    """Every searched value must make a valid recipe with at least one setting of the other keys."""
    space = spec.search.space
    keys = list(space)
    values = [candidate_values(space[k]) for k in keys]
    total = 1
    for v in values:
        total *= len(v)
    if total <= _MAX_COMBOS:
        combos = list(itertools.product(*values))
    else:
        rng = random.Random(spec.search.seed)
        combos = [tuple(rng.choice(v) for v in values) for _ in range(_MAX_COMBOS)]
    base = spec.model_dump(mode="json")
    ok: dict[str, set[str]] = {k: set() for k in keys}
    first_error: dict[tuple[str, str], str] = {}
    for combo in combos:
        config = dict(zip(keys, combo, strict=True))
        try:
            validate_recipe(apply_config(base, config), "trial")
        except ConfigError as exc:
            for k, v in config.items():
                first_error.setdefault((k, json.dumps(v)), _first_problem(str(exc)))
            continue
        for k, v in config.items():
            ok[k].add(json.dumps(v))
    for k, v in zip(keys, values, strict=True):
        for value in v:
            if json.dumps(value) not in ok[k] and (total <= _MAX_COMBOS or not any(ok.values())):
                reason = first_error.get((k, json.dumps(value)), "never makes a valid recipe")
                raise ConfigError(
                    f"search.space.{k}: value {value!r} never makes a valid recipe with the rest of the "
                    f"space ({reason}); drop it or change the other keys"
                )


def _first_problem(message: str) -> str:
    lines = [ln.strip(" -") for ln in message.splitlines()[1:] if ln.strip()]
    return lines[0] if lines else message


@dataclass
class Screen:
    """Decides, without training, whether a config may be launched: valid recipe and within budget."""

    base: dict[str, Any]
    space: dict[str, ParamSpace]
    in_chans: int
    num_classes: int
    image_size: int
    max_params: int | None = None
    max_flops: int | None = None
    match: str = "none"  # "params" / "flops": widths are matched to the base recipe's model

    def __post_init__(self) -> None:
        self._cache: dict[str, tuple[int, int]] = {}
        self._matched: dict[str, Any] = {}
        self._target: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_matched"] = {}, {}
        return state

    def target(self) -> int:
        """The budget every trial is matched to: the base recipe's model, as written."""
        if self._target is None:
            params, flops = self.cost(validate_recipe(self.base, "search base"))
            self._target = params if self.match == "params" else flops
        return self._target

    def matched(self, spec: RecipeSpec):
        """The widths that bring ``spec``'s model to the target budget (cached per model spec)."""
        from scalelab.tune.match import cost_function, match_widths

        key = f"{self.target()}:{spec.model.model_dump_json()}"
        if key not in self._matched:
            cost = cost_function(self.match, self.in_chans, self.num_classes, self.image_size)  # type: ignore[arg-type]
            self._matched[key] = match_widths(spec.model, self.target(), cost)
        return self._matched[key]

    def spec_for(self, config: dict[str, Any]) -> RecipeSpec:
        return validate_recipe(apply_config(self.base, decode_config(self.space, config)), "trial")

    def cost(self, spec: RecipeSpec) -> tuple[int, int]:
        """(parameters, forward FLOPs per image) of the model the spec builds; cached per model spec."""
        from scalelab.models.factory import build_model, count_flops, count_params

        key = spec.model.model_dump_json()
        if key not in self._cache:
            model = build_model(spec.model, self.in_chans, self.num_classes, self.image_size)
            self._cache[key] = (count_params(model), count_flops(model, self.in_chans, self.image_size))
        return self._cache[key]

    def check(self, config: dict[str, Any]) -> dict[str, Any]:
        """``{"ok", "reason", "params", "flops"}`` for a Tune config; with ``search.match`` also
        ``"config"`` (the config with the matched widths added) and the match's figures."""
        try:
            spec = self.spec_for(config)
        except ConfigError as exc:
            return {
                "ok": False,
                "reason": f"invalid recipe: {_first_problem(str(exc))}",
                "params": None,
                "flops": None,
            }
        extra: dict[str, Any] = {}
        if self.match != "none":
            from scalelab.tune.match import match_summary

            found = self.matched(spec)
            extra = match_summary(found, self.match)  # type: ignore[arg-type]
            if not found.ok:
                return {
                    "ok": False,
                    "reason": f"cannot match search.match={self.match} budget {found.target:,} within "
                    f"+-5% by width: closest {found.cost:,} ({found.ratio - 1:+.1%}) at widths "
                    f"{found.widths}",
                    "params": None,
                    "flops": None,
                    **extra,
                }
            config = {**config, MATCHED_WIDTHS: json.dumps(found.widths)}
            spec = self.spec_for(config)
            extra["config"] = config
        params, flops = self.cost(spec)
        reasons = []
        if self.max_params is not None and params > self.max_params:
            reasons.append(f"params {params:,} > search.max_params {self.max_params:,}")
        if self.max_flops is not None and flops > self.max_flops:
            reasons.append(f"FLOPs/image {flops:,} > search.max_flops {self.max_flops:,}")
        return {
            "ok": not reasons,
            "reason": "over budget: " + "; ".join(reasons) if reasons else None,
            "params": params,
            "flops": flops,
            **extra,
        }
