"""Runtime settings: the retries, timeouts and polling intervals of the machinery around a recipe.

A recipe says *what* to run; these say how patient the plumbing is (connecting to Ray, waiting for
servers to start, retrying MLflow calls, polling jobs). Each field has a default that suits the
embedded stack and is overridden by an environment variable ``SCALELAB_<FIELD NAME>`` (upper case),
e.g. ``SCALELAB_MLFLOW_START_TIMEOUT_S=300`` on a slow machine. Settings are read when used (never
cached), so a variable set in a test or a job's ``runtime_env`` takes effect at once.
"""

from __future__ import annotations

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from scalelab.errors import ConfigError

ENV_PREFIX = "SCALELAB_"


class RuntimeSettings(BaseSettings):
    """Every retry, timeout and polling interval of scalelab, in one place (``SCALELAB_*``)."""

    # extra="ignore": other SCALELAB_* variables (API key, submission id, ...) are not settings
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- Ray session ---------------------------------------------------------------------------------
    ray_connect_timeout_s: float = Field(
        10.0, gt=0, description="How long the Ray head's port may take to accept a connection."
    )
    ray_train_log_level: str = Field(
        "WARNING", description="Log level of Ray Train's own messages on the console (e.g. INFO)."
    )
    # -- local stack (`scalelab up`, test fixtures) --------------------------------------------------
    mlflow_start_timeout_s: float = Field(
        120.0, gt=0, description="How long `mlflow server` may take to answer /health when started."
    )
    s3_start_timeout_s: float = Field(
        60.0, gt=0, description="How long the S3-compatible server may take to answer when started."
    )
    ray_start_timeout_s: float = Field(
        90.0, gt=0, description="How long a `ray start` head or worker node may take to come up."
    )
    service_stop_timeout_s: float = Field(
        15.0, gt=0, description="How long a stopped service gets after SIGTERM before SIGKILL."
    )
    startup_poll_s: float = Field(0.3, gt=0, description="Pause between checks while a service starts.")
    http_probe_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of one HTTP probe of a starting service."
    )
    # -- MLflow logging (tracking/resilient.py, tracking/runs.py) ------------------------------------
    mlflow_call_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one buffered MLflow log call (one try, no client retries)."
    )
    mlflow_backoff_s: float = Field(
        0.5, gt=0, description="First wait before retrying buffered log calls; doubles per failure."
    )
    mlflow_max_backoff_s: float = Field(10.0, gt=0, description="Longest wait between log-call retries.")
    mlflow_open_attempts: int = Field(
        6, ge=1, description="Tries of each call that opens a run (experiment, run) before giving up."
    )
    mlflow_open_wait_s: float = Field(
        0.5, gt=0, description="First wait between those tries; doubles per try."
    )
    mlflow_open_timeout_s: float = Field(10.0, gt=0, description="Timeout of one of those tries.")
    mlflow_download_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of one HTTP request while downloading a run's model bundle."
    )
    mlflow_end_flush_s: float = Field(
        30.0, ge=0, description="Longest wait to send end-of-run calls (tags, run status)."
    )
    # -- Ray Serve (serve/commands.py) ---------------------------------------------------------------
    serve_ready_timeout_s: float = Field(
        120.0, gt=0, description="How long a deployed model's /readyz may take to answer 200."
    )
    serve_stop_timeout_s: float = Field(
        10.0, gt=0, description="How long `scalelab serve stop` waits for the app's route to go away."
    )
    # -- Ray jobs ------------------------------------------------------------------------------------
    job_poll_interval_s: float = Field(1.0, gt=0, description="How often a waited-for job's status is read.")
    job_wait_timeout_s: float = Field(
        3600.0, gt=0, description="How long `--wait` follows a job before giving up."
    )
    # -- testing -------------------------------------------------------------------------------------
    fault_inject: str | None = Field(
        None,
        description="Testing only: 'rank=R,epoch=E,marker=PATH' makes Ray Train worker R exit "
        "(os._exit(1)) right after reporting epoch E, once (PATH records that it happened), to "
        "exercise worker-failure recovery; with ',step=S' right after its mid-epoch checkpoint at "
        "optimiser step S of the epoch after E epochs. Unset in normal use.",
    )
    sample_log: str | None = Field(
        None,
        description="Testing only: append the sample ids of every streamed training batch (rank, "
        "epoch, position) to this JSON-lines file, to check exactly-once resume. Unset in normal use.",
    )


def runtime_settings() -> RuntimeSettings:
    """The settings as the environment says now; a bad value is a ConfigError naming the variable."""
    try:
        return RuntimeSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid scalelab setting(s) in the environment: {problems}") from None


def env_names() -> dict[str, str]:
    """Environment variable -> description, for documentation."""
    return {
        f"{ENV_PREFIX}{name.upper()}": field.description or ""
        for name, field in RuntimeSettings.model_fields.items()
    }
