"""MLflow tracking: URI resolution, resilient run logging, lineage, plots."""

from scalelab.tracking.uri import resolve_tracking_uri

__all__ = ["resolve_tracking_uri"]
