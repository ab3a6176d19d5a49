"""Log calls that survive a tracking server going away: retry with backoff, buffer, flush later.

Training must never die because MLflow is unreachable. Every log call becomes an operation in a
FIFO queue; the queue is flushed in order whenever the server answers. While it does not, calls
are buffered and retried with exponential backoff (each attempt is one short HTTP request, so a
training step is never held up for more than ``call_timeout_s``). At the end of a run
:meth:`ResilientLogger.flush` keeps trying for a while, then says exactly what was lost and saves
the lost metrics to a local JSON file so that nothing is silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.config.settings import runtime_settings

log = logging.getLogger("scalelab.tracking")

# Error codes that retrying cannot fix: the call is dropped (and reported), the rest goes on.
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000

# The short timeout of MLflow HTTP calls made inside quick_requests() in this thread / task; None
# outside. Only the code that asked for it sees it: never another thread, never os.environ.
_QUICK_TIMEOUT: ContextVar[float | None] = ContextVar("scalelab_mlflow_quick_timeout", default=None)
_install_lock = threading.Lock()
_installed = False


@contextlib.contextmanager
def quick_requests(timeout_s: float) -> Iterator[None]:
    """MLflow's own HTTP retries (7, exponential) would stall training for minutes: inside this
    block, MLflow HTTP calls made by this thread make one try each, with a ``timeout_s`` timeout.

    Scoped to the calling context (a ContextVar), so other threads' MLflow calls and the process
    environment are untouched. Calls MLflow runs in its own worker threads (parallel artifact
    downloads) keep MLflow's defaults.
    """
    _install_quick_overrides()
    token = _QUICK_TIMEOUT.set(max(1.0, float(timeout_s)))
    try:
        yield
    finally:
        _QUICK_TIMEOUT.reset(token)


def _install_quick_overrides() -> None:
    """Once per process: MLflow reads its HTTP retry and timeout settings through two
    ``_EnvironmentVariable`` objects (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT``) every
    time it makes a request; give those two a context-local value inside :func:`quick_requests`.
    Outside that block they read the environment exactly as before."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from mlflow import environment_variables as mlflow_env

        def scoped(var, quick_value: Callable[[float], str]) -> None:
            plain = var.get_raw

            def get_raw() -> str | None:
                timeout = _QUICK_TIMEOUT.get()
                return plain() if timeout is None else quick_value(timeout)

            var.get_raw = get_raw  # an instance attribute: only these two objects change

        scoped(mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES, lambda _t: "0")
        scoped(mlflow_env.MLFLOW_HTTP_REQUEST_TIMEOUT, lambda t: str(max(1, int(t))))
        _installed = True


def is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


@dataclass
class _Op:
    desc: str
    fn: Callable[[], Any]
    payload: dict[str, Any] = field(default_factory=dict)  # what to save locally if it is lost


@dataclass
class FlushReport:
    sent: int
    lost: list[str]  # descriptions of operations that never reached the server
    spill_path: str | None = None

    @property
    def ok(self) -> bool:
        return not self.lost


class ResilientLogger:
    """Buffered, retried MLflow logging for one run, through an ``MlflowClient``-like object.

    ``client`` needs ``log_batch(run_id, metrics, params, tags)`` and ``log_artifact(s)``; unit
    tests pass a fake. ``clock``/``sleep`` are injectable for the same reason. Timeout and backoff
    default to the ``SCALELAB_MLFLOW_CALL_TIMEOUT_S`` / ``_BACKOFF_S`` / ``_MAX_BACKOFF_S`` settings.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        call_timeout_s: float | None = None,
        backoff_s: float | None = None,
        max_backoff_s: float | None = None,
        spill_path: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        settings = runtime_settings()
        self.client = client
        self.run_id = run_id
        self.call_timeout_s = call_timeout_s or settings.mlflow_call_timeout_s
        self.backoff_s = backoff_s or settings.mlflow_backoff_s
        self.max_backoff_s = max_backoff_s or settings.mlflow_max_backoff_s
        self.spill_path = Path(spill_path) if spill_path else None
        self.clock = clock
        self.sleep = sleep
        self.queue: deque[_Op] = deque()
        self.failures = 0  # consecutive failed attempts (0: server answering)
        self.next_attempt = 0.0
        self.sent = 0
        self.dropped: list[str] = []
        self.outage_started: float | None = None
        self.last_error = ""
        self._lock = threading.RLock()

    # -- enqueueing ---------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        items = [Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i : i + MAX_METRICS_PER_BATCH]
            self._submit(
                _Op(
                    f"metrics step {step}",
                    lambda c=chunk: self.client.log_batch(self.run_id, metrics=c, params=[], tags=[]),
                    {"kind": "metrics", "step": step, "values": values},
                )
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._submit(
                _Op(
                    f"{len(chunk)} params",
                    lambda c=chunk: self.client.log_batch(self.run_id, metrics=[], params=c, tags=[]),
                    {"kind": "params", "values": {p.key: p.value for p in chunk}},
                )
            )

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._submit(
                _Op(
                    f"{len(chunk)} tags",
                    lambda c=chunk: self.client.log_batch(self.run_id, metrics=[], params=[], tags=c),
                    {"kind": "tags", "values": {t.key: t.value for t in chunk}},
                )
            )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        local_dir = str(local_dir)
        self._submit(
            _Op(
                f"artifacts {artifact_path or '.'}/ from {local_dir}",
                lambda: self.client.log_artifacts(self.run_id, local_dir, artifact_path),
                {"kind": "artifacts", "local": local_dir, "artifact_path": artifact_path},
            )
        )

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        local_file = str(local_file)
        self._submit(
            _Op(
                f"artifact {Path(local_file).name}",
                lambda: self.client.log_artifact(self.run_id, local_file, artifact_path),
                {"kind": "artifact", "local": local_file, "artifact_path": artifact_path},
            )
        )

    def call(self, desc: str, fn: Callable[[], Any], payload: dict[str, Any] | None = None) -> None:
        """Any other log call (e.g. ``mlflow.pytorch.log_model``), queued in order with the rest."""
        self._submit(_Op(desc, fn, payload or {"kind": "call"}))

    # -- sending ------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self.queue)

    def _submit(self, op: _Op) -> None:
        with self._lock:
            self.queue.append(op)
            self.try_flush()

    def try_flush(self) -> bool:
        """Send queued operations in order until one fails; never raises. True when the queue is empty."""
        with self._lock:
            if not self.queue:
                return True
            if self.failures and self.clock() < self.next_attempt:
                return False
            while self.queue:
                op = self.queue[0]
                try:
                    with quick_requests(self.call_timeout_s):
                        op.fn()
                except Exception as exc:  # noqa: BLE001 - any failure is buffered or reported, never raised
                    if is_permanent(exc):
                        self.queue.popleft()
                        self.dropped.append(op.desc)
                        log.warning("MLflow refused %s (%s); dropping it and going on", op.desc, _short(exc))
                        continue
                    self._note_failure(exc)
                    return False
                self.queue.popleft()
                self.sent += 1
                if self.failures:
                    self._note_recovery()
            return True

    def _note_failure(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = _short(exc)
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.failures - 1))
        self.next_attempt = self.clock() + delay
        if self.outage_started is None:
            self.outage_started = self.clock()
            log.warning(
                "MLflow tracking server unreachable (%s); training goes on, %d log call(s) buffered and "
                "retried with backoff",
                self.last_error,
                len(self.queue),
            )

    def _note_recovery(self) -> None:
        down = self.clock() - (self.outage_started or self.clock())
        log.warning(
            "MLflow tracking server is back after %.1fs; flushing %d buffered log call(s)",
            down,
            len(self.queue),
        )
        self.failures = 0
        self.outage_started = None

    def flush(self, timeout_s: float = 60.0) -> FlushReport:
        """Keep retrying until everything is sent or ``timeout_s`` passes; then report what was lost."""
        deadline = self.clock() + timeout_s
        while not self.try_flush():
            now = self.clock()
            if now >= deadline:
                break
            self.sleep(max(0.05, min(self.next_attempt, deadline) - now))
        with self._lock:
            lost = [op.desc for op in self.queue]
            spill = self._spill(list(self.queue)) if self.queue else None
            if self.queue:
                log.warning(
                    "MLflow tracking server still unreachable after %.0fs (%s): %d log call(s) NOT recorded "
                    "in run %s: %s.%s",
                    timeout_s,
                    self.last_error,
                    len(lost),
                    self.run_id,
                    ", ".join(lost[:8]) + (" ..." if len(lost) > 8 else ""),
                    f" They are saved in {spill}." if spill else "",
                )
            self.queue.clear()
            return FlushReport(self.sent, lost + self.dropped, str(spill) if spill else None)

    def _spill(self, ops: list[_Op]) -> Path | None:
        if self.spill_path is None:
            return None
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "run_id": self.run_id,
                "error": self.last_error,
                "lost": [op.payload | {"desc": op.desc} for op in ops],
            }
            self.spill_path.write_text(json.dumps(record, indent=2, default=str))
            return self.spill_path
        except OSError as exc:
            log.warning("could not save the unsent log calls to %s: %s", self.spill_path, exc)
            return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:MAX_PARAM_CHARS]


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
