"""Promotion history and the promotion lock, both kept in MLflow itself.

History: one registered-model tag per attempt, ``scalelab.history.<time_ns>.<random>`` holding a
JSON record (who, when, action, from, to, numbers, decision). Each attempt writes its own key, so
concurrent writers never overwrite each other, and the records live wherever the registry lives
(SQLite for the embedded default, the server's database on a cluster). MLflow keeps no history
of aliases itself (mlflow/mlflow#2169).

Lock: MLflow has no compare-and-set, but creating a registered model is atomic (a unique key in
the registry database: the second creator gets RESOURCE_ALREADY_EXISTS). So the lock is a
registered model ``<NAME>.promotion-lock`` created with its owner and expiry as tags and deleted
on release. It works across processes and machines against the same server — a file lock would
only cover one machine. A holder that crashed leaves a lock that expires after ``ttl_s``; a stale
lock is then broken. Because breaking is not atomic, the promoter also re-reads @champion right
before moving it and refuses if it changed since the gate ran.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from scalelab.errors import RegistryError
from scalelab.registry.store import HISTORY_PREFIX
from scalelab.tracking.bundles import LOCK_TAG


def whoami() -> str:
    user = os.environ.get("SCALELAB_USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry in some containers
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def record_attempt(client, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    now = time.time_ns()
    entry = {
        "time": datetime.fromtimestamp(now / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds"),
        "user": whoami(),
        "pid": os.getpid(),
        **entry,
    }
    key = f"{HISTORY_PREFIX}{now:020d}.{uuid.uuid4().hex[:6]}"
    client.set_registered_model_tag(name, key, json.dumps(entry, default=str, sort_keys=True))
    return entry


def read_history(client, name: str) -> list[dict[str, Any]]:
    model = client.get_registered_model(name)
    entries = []
    for key in sorted(k for k in (model.tags or {}) if k.startswith(HISTORY_PREFIX)):
        try:
            entries.append(json.loads(model.tags[key]))
        except ValueError:
            entries.append({"raw": model.tags[key], "decision": "unreadable"})
    return entries


def previous_champion(history: list[dict[str, Any]], current: str) -> str | None:
    """The version that was champion before ``current`` became champion (walks back on repeat)."""
    for entry in reversed(history):
        if entry.get("to") == current and entry.get("decision") == "promoted" and entry.get("from"):
            return str(entry["from"])
    return None


class PromotionLock:
    """Exclusive right to move @champion of one model, held as a registered model that exists."""

    def __init__(self, client, name: str, timeout_s: float = 300.0, ttl_s: float = 900.0) -> None:
        self.client = client
        self.name = name
        self.lock_name = f"{name}.promotion-lock"
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.token = f"{whoami()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False

    def __enter__(self) -> PromotionLock:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={LOCK_TAG: "1", "owner": self.token, "expires": f"{time.time() + self.ttl_s:.3f}"},
                    description=f"promotion lock of {self.name}; deleted when the promotion ends",
                )
                self.held = True
                return self
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                    raise
            holder = self._holder()
            if holder and float(holder.get("expires", 0)) < time.time():
                self._delete()  # a crashed holder's lock: expired, break it
                continue
            if time.monotonic() > deadline:
                owner = (holder or {}).get("owner", "?")
                raise RegistryError(
                    f"another promotion of {self.name!r} holds the lock ({owner}) for more than "
                    f"{self.timeout_s:.0f}s; retry later (a crashed holder's lock expires by itself)"
                )
            time.sleep(0.2 + random.random() * 0.3)

    def _holder(self) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.lock_name).tags or {})
        except MlflowException:
            return None

    def still_held(self) -> bool:
        return self.held and (self._holder() or {}).get("owner") == self.token

    def _delete(self) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model(self.lock_name)

    def __exit__(self, *exc) -> None:
        if self.held and self.still_held():
            self._delete()
        self.held = False
