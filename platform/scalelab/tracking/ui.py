"""The MLflow UI on the project's tracking store: what to start (or not) for a tracking URI.

An ``http(s)://`` tracking URI is a running ``mlflow server``: it *is* the UI, nothing to start.
Any other store MLflow can open as a backend (the embedded ``sqlite:///.../mlflow.db``, or a
database URL) gets a ``mlflow server`` of its own on loopback, reading the same store, with its
artifacts next to the embedded database (where scalelab's experiments keep theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import ConfigError


@dataclass(frozen=True)
class UiPlan:
    """``existing_url`` set: open that, nothing to start. Else start a server on ``backend_uri``."""

    tracking_uri: str
    existing_url: str | None = None
    backend_uri: str | None = None
    artifacts_destination: str | None = None


def plan_ui(tracking_uri: str) -> UiPlan:
    """What ``scalelab ui`` does for ``tracking_uri`` (refusing stores no MLflow server can read)."""
    if tracking_uri.startswith(("http://", "https://")):
        return UiPlan(tracking_uri, existing_url=tracking_uri.rstrip("/"))
    if tracking_uri.startswith("databricks"):
        raise ConfigError(
            f"tracking URI {tracking_uri!r} is Databricks-hosted MLflow: open the runs in your "
            f"Databricks workspace; `scalelab ui` serves local stores and prints server URLs"
        )
    artifacts = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.is_file():
            raise ConfigError(
                f"no MLflow store at {db} yet: nothing has been tracked in this folder. Run a verb "
                f"first (e.g. `scalelab train pipelines/digits.yaml`), or cd to the project folder"
            )
        artifacts = str((db.parent / "mlartifacts").resolve())
    return UiPlan(tracking_uri, backend_uri=tracking_uri, artifacts_destination=artifacts)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_of(tracking_uri: str, run_id: str) -> str | None:
    """The experiment id of a run (None when the store cannot say: the hint then omits the link)."""
    from mlflow import MlflowClient

    from scalelab.tracking.resilient import quick_requests

    try:
        with quick_requests(5):
            return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a hint is best effort
        return None


def run_location(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> list[str]:
    """Lines a verb prints for each MLflow run it creates: the id, the store, how to look at it."""
    lines = [f"MLflow run {run_id} at {tracking_uri}"]
    plan = plan_ui(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else None
    if plan is not None:
        experiment_id = experiment_id or experiment_of(tracking_uri, run_id)
        if experiment_id is not None:
            lines.append(f"view it: {run_url(plan.existing_url, experiment_id, run_id)}")
            return lines
    lines.append(f"view it: scalelab ui --run {run_id}")
    return lines
