"""Where tracking goes: recipe > $MLFLOW_TRACKING_URI > running `scalelab up` stack > embedded SQLite."""

from __future__ import annotations

import os

from scalelab.cluster.session import STATE_DIR, tracking_uri_of_stack
from scalelab.errors import ConfigError


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The MLflow tracking URI to use; the stack's server is asked of the Ray session module (a
    corrupt stack file is an error there, never a silent fall-back to the embedded store)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri_of_stack()
    if not uri:
        STATE_DIR.mkdir(exist_ok=True)
        uri = f"sqlite:///{(STATE_DIR / 'mlflow.db').resolve()}"
    if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///path/mlflow.db "
            f"or http://host:port (a `mlflow server`, e.g. from `scalelab up`)"
        )
    return uri
