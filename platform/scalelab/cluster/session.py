"""The one Ray session: the `scalelab up` stack file, Ray token auth, and :func:`connect_ray`.

Every command that needs Ray (train, tune, serve, the pipeline) connects through
:func:`connect_ray`; the job client finds the Jobs API through :func:`jobs_api_address`. Where a
driver connects, in order: the Ray this process already holds; ``$RAY_ADDRESS``; the head that
`scalelab up` recorded in ``.scalelab/stack.json`` (if its process still runs); else a new local
Ray of this process's own (``address="local"``: never a cluster someone else left on the machine).

A head started by `scalelab up` runs with token authentication; the stack file records that
(``ray_auth_mode``) and a driver connecting to it must say so too (:func:`use_auth_mode`).

This module is low in the stack: it depends on ``config`` and ``errors`` only, so tracking, train,
tune and serve may all use it. Starting and stopping the stack's processes is ``cluster/stack.py``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from scalelab.config.settings import runtime_settings
from scalelab.errors import ClusterError, ConfigError

STATE_DIR = Path(".scalelab")
STACK_FILE = STATE_DIR / "stack.json"


# ----------------------------------------------------------------------------- the stack file


def read_stack(path: Path = STACK_FILE) -> dict[str, Any]:
    """The running `scalelab up` stack's addresses and processes ({} when none is recorded).

    A file that is not a JSON object is an error, never "no stack": the processes it recorded may
    still run, and silently falling back (e.g. to an embedded MLflow store) would hide them.
    """
    if not path.is_file():
        return {}
    try:
        stack = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise _corrupt(path, f"it is not valid JSON ({exc})") from None
    if not isinstance(stack, dict):
        raise _corrupt(path, f"it holds a {type(stack).__name__}, not a JSON object")
    return stack


def _corrupt(path: Path, why: str) -> ClusterError:
    return ClusterError(
        f"the stack file {path} cannot be read: {why}. Delete it (`rm {path}`) and start the stack "
        f"again with `scalelab up`; processes it recorded may still run (their logs are in "
        f"{path.parent / 'stack'}/ and name their ports; stop them by pid)"
    )


def write_stack(stack: dict[str, Any], path: Path = STACK_FILE) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stack, indent=2))
    tmp.replace(path)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # our own child that exited but was not reaped is dead too
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def live_ray_address(path: Path = STACK_FILE) -> str | None:
    """The stack's Ray head address if its process still runs, else None."""
    stack = read_stack(path)
    for entry in stack.get("services", []):
        if entry.get("name") == "ray" and pid_alive(int(entry["pid"])):
            return stack.get("ray_address")
    return None


def tracking_uri_of_stack(path: Path = STACK_FILE) -> str | None:
    """The `scalelab up` MLflow server's URL, if the stack recorded one."""
    return read_stack(path).get("mlflow_url")


# ----------------------------------------------------------------------------- token auth


def use_auth_mode(mode: str | None) -> None:
    """Make this process's Ray use ``mode`` (e.g. "token") unless ``$RAY_AUTH_MODE`` says otherwise.

    Ray reads RAY_AUTH_MODE once when it is imported, so an already imported Ray re-reads it (as
    Ray's own token setup does).
    """
    if not mode or "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = mode
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray version: the env var alone must do
        pass


def quiet_serve_env() -> dict[str, str]:
    """Ray Serve logs every request (proxy and replica access lines) to stderr, which Ray streams to
    every connected driver's console: hundreds of lines for a smoke test. With this, Serve's logs
    (access lines included) go only to files in Ray's log folder (``<ray_logs>/serve/``)."""
    return {"RAY_SERVE_LOG_TO_STDERR": os.environ.get("RAY_SERVE_LOG_TO_STDERR", "0")}


INGRESS_ENV = "SCALELAB_SERVE_INGRESS"  # "haproxy" (default) or "proxy" (Ray Serve's Python proxy)
CLIENT_TIMEOUT_ENV = "SCALELAB_SERVE_CLIENT_TIMEOUT_S"  # HAProxy `timeout client` (default 10)


def serve_ingress() -> str:
    """Which HTTP ingress Serve runs with: ``haproxy`` unless ``$SCALELAB_SERVE_INGRESS=proxy``."""
    ingress = os.environ.get(INGRESS_ENV, "haproxy").strip().lower() or "haproxy"
    if ingress not in ("haproxy", "proxy"):
        raise ConfigError(f"{INGRESS_ENV}={ingress!r}: use 'haproxy' (the default) or 'proxy'")
    return ingress


def serve_ingress_env() -> dict[str, str]:
    """The environment a Ray cluster's processes need for our Serve ingress: the one place that decides it.

    Serve reads these once per process (its constants), so they must be in the environment of the
    raylet that starts the controller, proxies and replicas: ``ray start`` (`scalelab up`, the
    pipeline's head, worker nodes) or the driver that starts a local Ray (:func:`connect_ray`, the
    test session). With ``haproxy`` (default): Ray Serve's HAProxy ingress (3.4x the requests/s of
    the Python proxy at c=32, ``benchmarks/ingress.py``) plus ``RAY_SERVE_THROUGHPUT_OPTIMIZED``.
    HAProxy's fixed defaults are made safe for several clusters on one machine: its stats and
    Prometheus ports (8404, 9101, on all interfaces) become free ports, its sockets a per-user
    folder. ``timeout client``
    (``$SCALELAB_SERVE_CLIENT_TIMEOUT_S``, 10 s; Ray's default is an hour) cuts off clients that
    stop sending mid-request (slow-body / slowloris). A deleted application's replicas drain for
    3 s (Ray's floor under direct ingress is 30 s, which made `scalelab serve stop` take 31 s).
    Values already in this process's environment win (but for the two HAProxy ports).
    """
    # serve/guard.py's header guard (non-UTF-8 header bytes: a 400, not Ray's 500) runs in either
    # ingress; a string here, as this module sits below serve (equal to guard.PROXY_CALLBACK_ENV)
    guard = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "scalelab.serve.guard:ingress_middlewares"}
    if serve_ingress() == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", **guard}
    # Ray adds a subfolder per node (its 56-hex node id), so clusters on one machine never share a
    # socket; keep this prefix short: HAProxy refuses socket paths over 97 characters
    folder = Path(tempfile.gettempdir()) / f"scalelab-haproxy-{os.getuid()}"
    env = {
        **guard,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # ... but request logs written as they happen (it buffers 1000 lines: `tail -f` shows nothing)
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": os.environ.get(CLIENT_TIMEOUT_ENV, "10"),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
        # Serve kills a proxy not ready within 5 s; HAProxy's start takes longer on a loaded machine
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    # Never inherited: a process started from one that holds a cluster (a test session, a script)
    # would reuse that cluster's ports and its HAProxy would not start. Fixed ports for scraping:
    # $SCALELAB_SERVE_HAPROXY_STATS_PORT / $SCALELAB_SERVE_HAPROXY_METRICS_PORT.
    for what in ("STATS", "METRICS"):
        port = os.environ.get(f"SCALELAB_SERVE_HAPROXY_{what}_PORT") or str(_free_port())
        env[f"RAY_SERVE_HAPROXY_{what}_PORT"] = port
    return env


def _free_port() -> int:
    with socket.socket() as s:  # cluster/services.py's free_port sits a layer above this module
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_auth_env() -> dict[str, str]:
    """The environment a head started by `scalelab up` runs with: token auth unless
    ``$RAY_AUTH_MODE`` says otherwise; a token is made (``~/.ray/auth_token``) if there is none."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if (
        mode == "token"
        and not (Path.home() / ".ray" / "auth_token").is_file()
        and not os.environ.get("RAY_AUTH_TOKEN")
    ):
        import logging

        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        # Ray logs "Generated new authentication token and saved to ..." at INFO on the console of
        # whoever starts the head; the token file is Ray's documented default, nothing to act on.
        logging.getLogger(generate_and_save_token.__module__).setLevel(logging.WARNING)
        generate_and_save_token()
    return {"RAY_AUTH_MODE": mode}


# ----------------------------------------------------------------------------- connecting


# A new local Ray starts one idle Python worker per CPU; a Ray Train run cannot use them (its
# controller and everything it starts carry a runtime env of their own, the env vars Train
# propagates), so on a 2-core machine they only took CPU from the processes the first step awaits.
NO_PRESTARTED_WORKERS = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def connect_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    configure_logging: bool = True,
    include_dashboard: bool | None = False,
    prestart_workers: bool = True,
    stack_file: Path = STACK_FILE,
) -> bool:
    """Connect this process to Ray; returns True when this call connected (or started) it.

    ``address`` (e.g. a command's ``--address``) wins over ``$RAY_ADDRESS``, which wins over the
    `scalelab up` stack's live head; with none of them a new local Ray starts (``num_cpus``,
    ``include_dashboard``, ``prestart_workers`` apply only to that one). A head that does not answer within
    ``SCALELAB_RAY_CONNECT_TIMEOUT_S`` is a :class:`ClusterError` naming where its address came from.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address, source = ray_address_to_use(address, stack_file)
    if source == str(stack_file):
        use_auth_mode(read_stack(stack_file).get("ray_auth_mode"))
    if not address:
        os.environ.update(quiet_serve_env())  # its Serve logs (a line per request) to files
        os.environ.update(serve_ingress_env())
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=include_dashboard,
            log_to_driver=log_to_driver,
            configure_logging=configure_logging,
            _system_config=None if prestart_workers else NO_PRESTARTED_WORKERS,
        )
        return True
    _check_reachable(address, source)
    ray.init(address=address, log_to_driver=log_to_driver, configure_logging=configure_logging)
    return True


def ray_address_to_use(address: str | None = None, stack_file: Path = STACK_FILE) -> tuple[str | None, str]:
    """Where :func:`connect_ray` would connect, and where that address came from; ``(None, "local")``
    when it would start a new local Ray of this process's own."""
    if address and address != "local":
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS")
    if not address and env and env != "local":
        return env, "$RAY_ADDRESS"
    if not address and not env and (live := live_ray_address(stack_file)):
        return live, str(stack_file)
    return None, "local"


def _check_reachable(address: str, source: str) -> None:
    """Fail fast, and clearly, when a plain ``host:port`` head address does not accept connections
    (``ray.init`` would otherwise retry for a minute and say little). Other forms (``auto``,
    ``ray://``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return
    timeout = runtime_settings().ray_connect_timeout_s
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):  # [::1]:6379
            return
    except OSError as exc:
        raise ClusterError(
            f"no Ray head answers at {address} (from {source}): {exc}. Start one with `scalelab up`, "
            f"or point RAY_ADDRESS at a running head (unset it to use a local Ray)"
        ) from None


def jobs_api_address(explicit: str | None = None, stack_file: Path = STACK_FILE) -> str:
    """The Ray Jobs API (dashboard) URL: ``explicit``, ``$RAY_DASHBOARD_ADDRESS``, or the stack's.

    The stack's head runs with token auth: talking to it, this process says so too.
    """
    stack = read_stack(stack_file)
    addr = explicit or os.environ.get("RAY_DASHBOARD_ADDRESS") or stack.get("dashboard_url")
    if not addr:
        raise ClusterError(
            "no Ray cluster to submit to: pass --address http://HEAD:8265, set RAY_DASHBOARD_ADDRESS, "
            "or start a local one with `scalelab up`"
        )
    if addr == stack.get("dashboard_url"):
        use_auth_mode(stack.get("ray_auth_mode"))
    return addr
