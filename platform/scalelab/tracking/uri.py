"""Where tracking goes: recipe > $MLFLOW_TRACKING_URI > running `scalelab up` stack > embedded SQLite."""

from __future__ import annotations

import json
import os
from pathlib import Path

from scalelab.errors import ConfigError

STATE_DIR = Path(".scalelab")
STACK_FILE = STATE_DIR / "stack.json"


def read_stack(path: Path = STACK_FILE) -> dict:
    """The running `scalelab up` stack's addresses and processes ({} when none is recorded)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or read_stack().get("mlflow_url")
    if not uri:
        STATE_DIR.mkdir(exist_ok=True)
        uri = f"sqlite:///{(STATE_DIR / 'mlflow.db').resolve()}"
    if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///path/mlflow.db "
            f"or http://host:port (a `mlflow server`, e.g. from `scalelab up`)"
        )
    return uri
