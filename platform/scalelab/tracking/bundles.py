"""Bundles in MLflow: runs' ``bundle/`` artifacts and registered versions, read with clear errors.

A registered version points at the MLflow run that trained it; the run's ``bundle/`` artifacts
(``model.safetensors`` + ``model.json``) are what gates and replicas load. The version's
``weights_sha256`` tag, written at registration, is checked against the downloaded weights so a
file changed in the artifact store after registration is refused, never served. The registry
(register, promote, rollback) and Serve both read bundles through here (so neither imports the
other); only the registry writes. Failures say what happened: credentials refused, server
unreachable, or truly no bundle (:func:`classify_store_error`).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from scalelab.artifacts.bundle import MODEL_META, WEIGHTS, read_bundle_meta, sha256_file
from scalelab.errors import CheckpointError, RegistryError, ScalelabError, TrackingError
from scalelab.tracking.runs import download_bundle
from scalelab.tracking.uri import resolve_tracking_uri

BUNDLE_DIR = "bundle"  # a run's artifact folder holding its model bundle
LOCK_TAG = "scalelab.lock"  # marks the registry's promotion-lock models, which are not models


def connect(uri: str | None = None):
    """An ``MlflowClient`` for the resolved tracking URI, after checking a server answers."""
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    # A dead server otherwise costs minutes of client retries before any message.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: auth or a proxy path, not an outage
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout
        raise TrackingError(
            f"tracking server {uri} is unreachable "
            f"({exc.__class__.__name__}: {getattr(exc, 'reason', exc)}); "
            f"start it (`scalelab up`) or point MLFLOW_TRACKING_URI / tracking.uri at a running server"
        ) from None


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


AUTH_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"}
MISSING_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND"}
AUTH_S3_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
MISSING_S3_CODES = {"NoSuchKey", "NoSuchBucket", "404"}
AUTH_CLASSES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
NETWORK_CLASSES = {
    "ConnectionError",  # the builtin (refused, reset) and requests' own
    "Timeout",
    "TimeoutError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "NewConnectionError",
    "MaxRetryError",
    "gaierror",
}
NETWORK_HINTS = (
    "max retries exceeded",
    "connection refused",
    "failed to establish a new connection",
    "name or service not known",
    "temporary failure in name resolution",
    "timed out",
    "timeout exception",
    "connection aborted",
    "remotedisconnected",
)


def classify_store_error(exc: BaseException) -> str:
    """What an MLflow / artifact-store failure means: 'auth', 'network', 'missing' or 'other'.

    Reads MLflow error codes, HTTP statuses (requests), S3 error codes (botocore) and the
    exception types of the network stack, following the exception's causes.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = _classify_one(current)
        if kind != "other":
            return kind
        current = current.__cause__ or current.__context__
    return "other"


def _classify_one(exc: BaseException) -> str:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & AUTH_CLASSES:
        return "auth"
    if names & NETWORK_CLASSES:
        return "network"
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        s3_code = str((response.get("Error") or {}).get("Code", ""))
        if s3_code in AUTH_S3_CODES:
            return "auth"
        if s3_code in MISSING_S3_CODES:
            return "missing"
    status = getattr(response, "status_code", None)  # requests HTTPError
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "missing"
    code = _code(exc)
    if code in AUTH_CODES:
        return "auth"
    if code in MISSING_CODES:
        return "missing"
    if code == "TEMPORARILY_UNAVAILABLE" or any(h in str(exc).lower() for h in NETWORK_HINTS):
        return "network"
    return "other"


def store_error(exc: BaseException, action: str, uri: str) -> ScalelabError:
    """A clear error for a failed ``action`` against ``uri`` that is not simply a missing object."""
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    kind = classify_store_error(exc)
    if kind == "auth":
        return TrackingError(
            f"{action}: {uri} refused the credentials ({detail}). Set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (MLflow basic auth) or the artifact store's AWS credentials, and retry"
        )
    if kind == "network":
        return TrackingError(
            f"{action}: {uri} is unreachable ({detail}). Check that the server is running "
            f"(`scalelab up`) and its address, and retry"
        )
    return TrackingError(f"{action} failed at {uri}: {detail}")


def get_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in _code(exc) or "not found" in str(exc).lower():
            known = [m.name for m in client.search_registered_models(max_results=50) if not is_lock(m)]
            raise RegistryError(
                f"no registered model named {name!r}; known models: {', '.join(known) or 'none'} "
                f"(register one with `scalelab register <run-id>`)"
            ) from None
        raise TrackingError(f"registry call failed for model {name!r}: {exc}") from None


def is_lock(model) -> bool:
    return LOCK_TAG in (model.tags or {})


def list_versions(client, name: str) -> list:
    versions = client.search_model_versions(f"name = '{_quote(name)}'")
    return sorted(versions, key=lambda v: int(v.version))


def get_version(client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    get_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = [v.version for v in list_versions(client, name)]
        raise RegistryError(
            f"model {name!r} has no version {version}; versions: {', '.join(known) or 'none'}"
        ) from None


def version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    model = get_model(client, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
        raise RegistryError(f"model {name!r} has no alias @{alias}; aliases: {aliases}") from None


def resolve_version(client, name: str, version: str | int | None = None, alias: str | None = None):
    if (version is None) == (alias is None):
        raise RegistryError("give exactly one of a version (--version V) or an alias (--alias A)")
    return (
        get_version(client, name, version) if version is not None else version_by_alias(client, name, alias)
    )


def download_run_bundle(client, run_id: str, dest: str | Path) -> Path:
    """The ``bundle/`` artifacts of a run, downloaded into ``dest``; returns the bundle folder."""
    path = download_bundle(run_id, dest, tracking_uri=client.tracking_uri)
    if not (path / MODEL_META).is_file() and (path / BUNDLE_DIR / MODEL_META).is_file():
        path = path / BUNDLE_DIR
    if not (path / MODEL_META).is_file():
        raise RegistryError(
            f"run {run_id} has no model bundle ({BUNDLE_DIR}/model.json + {BUNDLE_DIR}/model.safetensors); "
            f"was it logged by `scalelab train` with tracking enabled?"
        )
    return path


def fetch_version_bundle(client, mv, dest: str | Path) -> Path:
    """Download a version's bundle and check its weights against the registered checksum."""
    if not mv.run_id:
        raise RegistryError(f"version {mv.version} of {mv.name!r} has no run id: cannot find its bundle")
    path = download_run_bundle(client, mv.run_id, dest)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"version {mv.version} of {mv.name!r}: {WEIGHTS} is missing from run {mv.run_id}"
        )
    actual = sha256_file(weights)
    registered = (mv.tags or {}).get("weights_sha256")
    meta = read_bundle_meta(path)
    if registered is None:
        raise RegistryError(
            f"version {mv.version} of {mv.name!r} has no weights_sha256 tag: it was not registered by "
            f"`scalelab register`, so its weights cannot be verified"
        )
    if actual != registered or meta.get("weights_sha256") not in (None, registered):
        raise CheckpointError(
            f"version {mv.version} of {mv.name!r} fails its checksum: weights sha256 {actual[:12]}... but "
            f"{registered[:12]}... was registered. The artifact was modified or corrupted after "
            f"registration; refusing to use it (register a fresh run instead)"
        )
    return path


def version_info(mv) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    return {
        "name": mv.name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "aliases": list(getattr(mv, "aliases", []) or []),
        "data_version": {k[5:]: v for k, v in tags.items() if k.startswith("data.")},
        "git_commit": tags.get("git.commit"),
        "spec_hash": tags.get("scalelab.spec_hash"),
        "weights_sha256": tags.get("weights_sha256"),
        "metrics": {k[7:]: v for k, v in tags.items() if k.startswith("metric.")},
    }


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
