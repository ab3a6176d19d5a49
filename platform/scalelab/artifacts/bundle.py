"""The model bundle: safetensors for the weights, JSON for the rest, a checksum over both. Never a pickle.

A bundle (what training writes and evaluation, the registry and serving load) is a folder with:
  model.safetensors  the weights
  model.json         ``model``: the fully resolved model spec (every ModelSpec field, the variant's
                     config already applied) with in_chans, num_classes and image_size;
                     ``recipe`` (the run's whole recipe), ``dataset`` (classes, mean/std, shape),
                     ``data_version``, ``precision`` and the weights' sha256
The model is rebuilt from ``model`` alone, so renaming or changing a registered variant never
breaks an old bundle. Bundles written before ``model`` was recorded are rebuilt from their recipe
(which needs their variant still registered as it was).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from scalelab.config.specs import ModelSpec
from scalelab.errors import CheckpointError
from scalelab.models.factory import build_model

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
BUNDLE_FORMAT = 2  # 2: model.json records the resolved model spec (1: the recipe only)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` without the variant registry: its resolved spec
    (variant cleared, its config already in every field) and its input/output shape."""
    net = unwrap(model)
    spec = getattr(net, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise CheckpointError(f"{type(net).__name__} has no ModelSpec: only scalelab models make bundles")
    return {
        "spec": {**spec.model_dump(mode="json"), "variant": None},
        "variant": spec.variant,  # the name it was built from, for people; loading ignores it
        "in_chans": int(net.in_chans),
        "num_classes": int(net.num_classes),
        "image_size": int(net.image_size),
    }


def save_model_bundle(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write weights + metadata (with the model's resolved spec and the weights' sha256)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    meta = {
        **meta,
        "bundle_format": BUNDLE_FORMAT,
        "model": describe_model(model),
        "weights_sha256": sha256_file(out / WEIGHTS),
    }
    (out / MODEL_META).write_text(json.dumps(meta, indent=2, default=str))
    return out


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / MODEL_META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {path} is not a scalelab model bundle")
    return json.loads(meta_path.read_text())


def bundle_model_spec(meta: dict[str, Any]) -> tuple[ModelSpec, int, int, int]:
    """(spec, in_chans, num_classes, image_size) of the model a bundle's ``model.json`` describes."""
    record = meta.get("model")
    if record:
        spec = ModelSpec.model_validate({**record["spec"], "variant": None})
        return spec, int(record["in_chans"]), int(record["num_classes"]), int(record["image_size"])
    # a bundle from before the resolved spec was recorded: its recipe names a variant
    recipe_model = (meta.get("recipe") or {}).get("model") or {}
    try:
        spec = ModelSpec.model_validate(recipe_model)
    except (ValidationError, ValueError) as exc:
        raise CheckpointError(
            f"this bundle predates resolved specs (bundle_format 1) and its recipe's model "
            f"{recipe_model.get('variant')!r} cannot be rebuilt here: {exc}. Re-register the variant as it "
            f"was when the bundle was trained, or retrain"
        ) from None
    data = meta["dataset"]
    return spec, int(data["channels"]), int(data["num_classes"]), int(data["image_size"])


def load_model_bundle(path: str | Path, verify_checksum: bool = True, map_location: str = "cpu"):
    """Rebuild the model from its recorded spec and load its weights. Returns (model, meta)."""
    path = Path(path)
    meta = read_bundle_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    if verify_checksum and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights} fails its checksum (expected sha256 {meta['weights_sha256'][:12]}...): the "
            f"file was modified or corrupted; refusing to load it"
        )
    model = build_model(*bundle_model_spec(meta))
    load_weights(model, load_file(str(weights), device=map_location), source=str(weights))
    return model, meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, explaining every missing, unexpected or mis-shaped tensor."""
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {'; '.join(mismatched[:3])}")
        raise CheckpointError(
            f"weights in {source} do not fit the model built from the spec: {', '.join(parts)}. "
            f"Was the spec changed (model.* overrides) since the checkpoint was written?"
        )
    unwrap(model).load_state_dict(state)
