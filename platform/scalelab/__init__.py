"""scalelab: multi-scale ResNet experiment platform.

Layers, lowest first; a module imports only from lower layers (tests/unit/test_layering.py holds it):

    errors                      what a user is told when something is wrong
    config                      typed specs, recipe loading, runtime settings (SCALELAB_*), model variants
    cluster.session             the one Ray session: .scalelab/stack.json, token auth, connect_ray
    models -> artifacts         networks; model bundles, Predictor and preprocessing built on them
    data -> tracking -> train   datasets; MLflow logging; the training loop and Ray Train assembly
    tune | registry | cluster   searches; register/promote; `scalelab up/down` and Ray jobs;
    | predict                   batch inference on Ray Data (`scalelab predict`)
    serve -> pipeline -> cli    Ray Serve; the whole path of one model; the command line
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

# Like Ray's usage stats (off unless RAY_USAGE_STATS_ENABLED says otherwise), MLflow's telemetry is
# off unless MLFLOW_DISABLE_TELEMETRY says otherwise: no background reporting thread and no flush
# with network timeouts at exit (seconds on an offline machine). Child processes inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def lazy_exports(package: str, home: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` (PEP 562) for ``package``: each name in ``home`` is imported
    from ``package.<home[name]>`` on first use, then kept as a plain attribute of the package."""

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
