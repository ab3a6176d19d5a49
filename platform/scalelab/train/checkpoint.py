"""Checkpoints and model bundles: safetensors for tensors, JSON for the rest. Never a pickle.

A model bundle (what registry and serving load) is a folder with:
  model.safetensors  weights
  model.json         recipe (spec), dataset metadata (classes, mean/std, shape), data version
A training checkpoint is a model bundle plus:
  optimizer.safetensors + trainer_state.json   optimiser tensors, param groups, scheduler,
                                               epoch, history, RNG states
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelab.errors import CheckpointError

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
OPTIM = "optimizer.safetensors"
STATE = "trainer_state.json"


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_model_bundle(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write weights + metadata; the weights' sha256 goes into the metadata."""
    from scalelab.data.dataset import sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    meta = {**meta, "weights_sha256": sha256_file(out / WEIGHTS)}
    (out / MODEL_META).write_text(json.dumps(meta, indent=2, default=str))
    return out


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / MODEL_META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {path} is not a scalelab model bundle")
    return json.loads(meta_path.read_text())


def load_model_bundle(path: str | Path, verify_checksum: bool = True, map_location: str = "cpu"):
    """Rebuild the model from its spec and load its weights. Returns (model, meta)."""
    from scalelab.config.specs import ModelSpec
    from scalelab.data.dataset import sha256_file
    from scalelab.models.factory import build_model

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
    spec = ModelSpec.model_validate(meta["recipe"]["model"])
    data = meta["dataset"]
    model = build_model(spec, data["channels"], data["num_classes"], data["image_size"])
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


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in info["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def save_training_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    history: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    out = save_model_bundle(model, out_dir, meta)
    tensors, info = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(out / OPTIM))
    np_state = np.random.get_state()
    state = {
        "epoch": epoch,
        "history": history,
        "optimizer": info,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
    }
    (out / STATE).write_text(json.dumps(state, default=str))
    return out


def restore_training_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, list[dict[str, Any]]]:
    """Load model/optimiser/scheduler/RNG state. Returns (epochs completed, history)."""
    path = Path(path)
    for name in (WEIGHTS, OPTIM, STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    load_weights(model, load_file(str(path / WEIGHTS)), source=str(path / WEIGHTS))
    tensors = load_file(str(path / OPTIM))
    torch.set_rng_state(tensors.pop("rng.torch"))
    state = json.loads((path / STATE).read_text())
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    py = state["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["rng"]["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    return int(state["epoch"]), list(state["history"])
