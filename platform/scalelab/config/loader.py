"""Load recipes from YAML with dotted command-line overrides, and explain every error."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from scalelab.config.specs import RecipeSpec
from scalelab.errors import ConfigError


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (for example train.epochs=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for key ``"a.b"``, creating sections as needed."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    tree = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(tree, key, value)
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        hint = ", ".join(sorted(p.name for p in Path("pipelines").glob("*.yaml"))) or "none found"
        raise ConfigError(f"recipe {str(path)!r} does not exist (recipes in pipelines/: {hint})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def explain_validation(source: str, exc: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"{source}: invalid recipe ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        else:
            msg = err["msg"]
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(str(part))
        if field is None:
            return []
        node = field.annotation
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(node.model_fields)
    return []


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> RecipeSpec:
    try:
        return RecipeSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain_validation(source, exc, RecipeSpec)) from None


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RecipeSpec:
    """Read a recipe file, apply ``key=value`` overrides, validate. Errors name file and key."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_recipe(raw, str(path))


def recipe_to_dict(spec: BaseModel) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"train.lr": 0.1, ...}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def spec_hash(spec: BaseModel) -> str:
    """Stable short hash of a spec's content (sorted JSON)."""
    blob = json.dumps(recipe_to_dict(spec), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_recipe(spec: RecipeSpec, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_to_dict(spec), sort_keys=False))
    return path
