"""MLflow tracking: URI resolution, resilient run logging, lineage, plots."""

from scalelab.tracking.resilient import FlushReport, ResilientLogger
from scalelab.tracking.runs import (
    EpochLogger,
    RunTarget,
    download_bundle,
    end_run,
    log_training_result,
    start_training_run,
)
from scalelab.tracking.uri import resolve_tracking_uri

__all__ = [
    "EpochLogger",
    "FlushReport",
    "ResilientLogger",
    "RunTarget",
    "download_bundle",
    "end_run",
    "log_training_result",
    "resolve_tracking_uri",
    "start_training_run",
]
