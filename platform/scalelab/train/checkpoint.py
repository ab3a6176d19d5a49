"""Training checkpoints: a model bundle (``artifacts.bundle``) plus what resuming needs.

  optimizer.safetensors + trainer_state.json   optimiser tensors, param groups, scheduler,
                                               epoch, history, RNG states, and for a
                                               mid-epoch checkpoint the position in the epoch
Safetensors and JSON only, never a pickle.
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

from scalelab.artifacts.bundle import WEIGHTS, load_weights, save_model_bundle
from scalelab.errors import CheckpointError

OPTIM = "optimizer.safetensors"
STATE = "trainer_state.json"


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
    position: dict[str, Any] | None = None,
) -> Path:
    """``epoch``: epochs completed. ``position`` (mid-epoch checkpoints): ``{"epoch": index of the
    epoch in progress, "consumed": samples each rank consumed of it, "world_size"}``."""
    out = save_model_bundle(model, out_dir, meta)
    tensors, info = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(out / OPTIM))
    np_state = np.random.get_state()
    state = {
        "epoch": epoch,
        "position": position,
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


def read_position(path: str | Path) -> dict[str, Any] | None:
    """Where in an epoch a mid-epoch checkpoint was taken (None for an epoch-end checkpoint)."""
    state = json.loads((Path(path) / STATE).read_text())
    return state.get("position")
