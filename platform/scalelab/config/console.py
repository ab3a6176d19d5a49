"""A quiet console: third-party chatter a user cannot act on goes below the console's level.

Each entry says whose line it silences; the information stays where it belongs (Ray's log files,
MLflow's run pages). Our own lines (run ids, where to look, per-epoch progress) replace it.
"""

from __future__ import annotations

import logging
import os

# logger -> level, with the line each one printed on every run
QUIET_LOGGERS = {
    "optuna": logging.WARNING,  # "A new study created in memory with name: optuna"
    "ray.tune": logging.WARNING,  # "Wrote the latest version of all result files ..."
    "ray.train._internal.storage": logging.WARNING,  # "Checkpoint successfully created at: ..."
    "ray.train.v2._internal.execution.storage": logging.WARNING,  # the same, Train V2
    "mlflow.store.model_registry.abstract_store": logging.WARNING,  # "Waiting up to 300 seconds ..."
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."
}


def quiet_third_party_logs() -> None:
    """Raise the loggers above (in this process; Ray workers call it too) and stop MLflow printing
    "View run ... at" / "View experiment at" for every run it closes: we print one run link."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
