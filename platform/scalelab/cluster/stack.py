"""The local stack `scalelab up` starts: MLflow server, optional S3 server, a Ray head.

Every process is ours by pid (``ray start --block`` in its own session, never ``ray stop``), and
``.scalelab/stack.json`` records them so that ``scalelab down`` stops exactly those and nothing
else. The file also holds the addresses other commands read (``mlflow_url``, ``ray_address``,
``s3_url``, ``dashboard_url``).

The stack is a list of named :class:`Service` entries built by starter functions; adding a kind
of process (e.g. Ray worker nodes joining the head, issue 8) means one more starter and one more
entry, with ``up``/``down``/``status`` unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scalelab.cluster.services import (
    BIN,
    Service,
    _spawn,
    free_port,
    start_mlflow_server,
    start_s3_server,
)
from scalelab.cluster.session import (
    STACK_FILE,
    STATE_DIR,
    head_auth_env,
    pid_alive,
    quiet_serve_env,
    read_stack,
    serve_ingress,
    serve_ingress_env,
    write_stack,
)
from scalelab.config.settings import runtime_settings
from scalelab.errors import ScalelabError

# Which stack.json address key each service provides.
ADDRESS_KEYS = {"mlflow": "mlflow_url", "s3": "s3_url", "ray": "ray_address"}


def services_of(stack: dict[str, Any]) -> list[Service]:
    return [Service(**entry) for entry in stack.get("services", [])]


def _wait_port(host: str, port: int, timeout: float, svc: Service, ready_line: str | None = None) -> None:
    """Wait until ``host:port`` accepts connections (and ``ready_line`` is in the service's log)."""
    poll = runtime_settings().startup_poll_s
    deadline = time.time() + timeout
    while time.time() < deadline:
        log_text = Path(svc.log).read_text(errors="replace") if Path(svc.log).exists() else ""
        if not svc.alive():
            raise ScalelabError(f"{svc.name} exited while starting:\n{log_text[-2000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            port_open = s.connect_ex((host, port)) == 0
        if port_open and (ready_line is None or ready_line in log_text):
            return
        time.sleep(poll)
    raise ScalelabError(f"{svc.name} did not open {host}:{port} within {timeout:.0f}s (log: {svc.log})")


def _node_args(host: str, ports: dict[str, int]) -> list[str]:
    """Flags every node on this machine needs: its IP, and free ports for its agents, so several
    raylets (head and workers) can run side by side."""
    return [
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        host,
        "--dashboard-agent-listen-port",
        str(ports["agent_listen"]),
        "--dashboard-agent-grpc-port",
        str(ports["agent_grpc"]),
        "--runtime-env-agent-port",
        str(ports["runtime_env"]),
    ]


def start_ray_head(
    state_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    num_cpus: int | None = None,
    dashboard: bool = True,
    timeout: float | None = None,
) -> tuple[Service, dict[str, str]]:
    """``ray start --head --block`` as a child in its own session; every port is a free one.
    ``timeout``: default ``SCALELAB_RAY_START_TIMEOUT_S``."""
    timeout = timeout or runtime_settings().ray_start_timeout_s
    state = Path(state_dir).resolve()
    port = port or free_port(host)
    ports = {
        name: free_port(host) for name in ("client", "dashboard", "agent_listen", "agent_grpc", "runtime_env")
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        *_node_args(host, ports),
        "--port",
        str(port),
        "--ray-client-server-port",
        str(ports["client"]),
        f"--include-dashboard={str(dashboard).lower()}",
    ]
    if dashboard:
        cmd += ["--dashboard-host", host, "--dashboard-port", str(ports["dashboard"])]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    # A private temp dir keeps `ray start` from writing /tmp/ray/ray_current_cluster, which would make
    # every plain ray.init() on this machine (other users, test sessions) attach to this head.
    temp_dir = Path(tempfile.gettempdir()) / f"scalelab-ray-{port}"
    cmd += ["--temp-dir", str(temp_dir)]
    log = state / f"ray-head-{port}.log"
    # Token authentication (Ray's default when ~/.ray/auth_token exists) made explicit: drivers
    # that connect must then say so too (stack.json's ray_auth_mode; session.connect_ray reads it).
    auth_env = head_auth_env()
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        **auth_env,
        **quiet_serve_env(),
        **serve_ingress_env(),  # Serve's HTTP ingress (HAProxy by default) for apps on this cluster
    }
    proc = _spawn("ray", cmd, log, env)
    svc = Service("ray", proc.pid, f"{host}:{port}", str(log))
    try:
        # GCS listens long before the node is up (a slow raylet start still fails afterwards)
        _wait_port(host, port, timeout, svc, ready_line="Ray runtime started")
        if dashboard:  # with token auth the dashboard answers 401 to us: that still means "up"
            _wait_port(host, ports["dashboard"], timeout, svc)
    except ScalelabError:
        svc.stop()
        raise
    addresses = {
        "ray_address": f"{host}:{port}",
        "ray_auth_mode": auth_env["RAY_AUTH_MODE"],
        "ray_logs": str(temp_dir / "session_latest" / "logs"),  # Serve's access logs: serve/
        "serve_ingress": serve_ingress(),
    }
    if dashboard:
        addresses["dashboard_url"] = f"http://{host}:{ports['dashboard']}"
    return svc, addresses


def start_ray_worker(
    state_dir: str | Path,
    head_address: str,
    index: int,
    num_cpus: int,
    host: str = "127.0.0.1",
    auth_mode: str | None = None,
    timeout: float | None = None,
) -> Service:
    """One more node: ``ray start --address HEAD --block`` with its own raylet and free ports."""
    settings = runtime_settings()
    timeout = timeout or settings.ray_start_timeout_s
    state = Path(state_dir).resolve()
    ports = {name: free_port(host) for name in ("agent_listen", "agent_grpc", "runtime_env", "metrics")}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--address",
        head_address,
        *_node_args(host, ports),
        "--num-cpus",
        str(num_cpus),
        "--metrics-export-port",
        str(ports["metrics"]),
        "--resources",
        json.dumps({f"scalelab_worker_{index}": 1}),
        # A node of its own log folder: without it a worker node on this machine shares the head's
        # session logs, and every node's log monitor streams every worker's lines (3 nodes: 3x).
        # One folder per start (its agent port): a node restarted with the same index would otherwise
        # find the dead node's logs there and stream them into job consoles again. Short: Ray's
        # socket paths under it must stay within 107 characters.
        "--temp-dir",
        str(
            Path(tempfile.gettempdir())
            / f"scalelab-ray-{head_address.rsplit(':', 1)[-1]}-w{index}-{ports['agent_grpc']}"
        ),
    ]
    log = state / f"ray-worker-{index}-{ports['agent_grpc']}.log"
    # the head's Serve settings: replicas on this node must run the same ingress (direct ingress)
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        **quiet_serve_env(),
        **serve_ingress_env(),
    }
    if auth_mode:
        env["RAY_AUTH_MODE"] = auth_mode
    proc = _spawn("ray-worker", cmd, log, env)
    svc = Service(f"ray-worker-{index}", proc.pid, head_address, str(log))
    deadline = time.time() + timeout
    while time.time() < deadline:  # `ray start` prints this once the raylet has joined the head
        if not svc.alive():
            raise ScalelabError(f"{svc.name} exited while joining {head_address}:\n{_tail(log)}")
        if "Ray runtime started" in _tail(log, 20000):
            return svc
        time.sleep(settings.startup_poll_s)
    svc.stop()
    raise ScalelabError(f"{svc.name} did not join {head_address} within {timeout:.0f}s (log: {log})")


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def up(
    mlflow: bool = True,
    s3: bool = False,
    ray: bool = True,
    num_cpus: int | None = None,
    state_dir: Path = STATE_DIR,
    host: str = "127.0.0.1",
    workers: int = 0,
    cpus_per_worker: int | None = None,
) -> dict[str, Any]:
    """Start what is asked for and not already running; record it in stack.json. Returns the stack.

    ``workers`` > 0 adds that many worker nodes (separate raylets joining the head), each offering
    ``cpus_per_worker`` CPUs (default: the machine's CPUs split between them); the head then
    offers 1 CPU (for job entrypoints and drivers) unless ``num_cpus`` says otherwise.
    """
    if host not in ("127.0.0.1", "localhost"):
        import warnings

        warnings.warn(
            f"binding the stack to {host}: Ray's dashboard/Jobs API runs arbitrary code and MLflow and "
            f"S3 have no auth here; put authentication in front (see platform/kuberay/README.md)",
            stacklevel=2,
        )
    if workers and num_cpus is None:
        num_cpus = 1
    stack = read_stack()
    running = {s.name: s for s in services_of(stack) if pid_alive(s.pid)}
    stack["services"] = [s.to_dict() for s in running.values()]
    state = state_dir / "stack"
    state.mkdir(parents=True, exist_ok=True)
    started: list[Service] = []
    try:
        if s3 and "s3" not in running:
            svc = start_s3_server(state, host=host)
            started.append(svc)
            stack["s3_url"] = svc.url
        if mlflow and "mlflow" not in running:
            artifacts = None
            if s3 or "s3" in running:
                artifacts = _s3_artifacts_bucket(stack["s3_url"])
            svc = start_mlflow_server(
                state / "mlflow",
                host=host,
                artifacts_destination=artifacts,
                extra_env={"MLFLOW_S3_ENDPOINT_URL": stack["s3_url"], **_dummy_aws_env()}
                if artifacts
                else None,
            )
            started.append(svc)
            stack["mlflow_url"] = svc.url
        if ray and "ray" not in running:
            svc, addresses = start_ray_head(state, host=host, num_cpus=num_cpus)
            started.append(svc)
            stack.update(addresses)
            stack["python"] = sys.executable
        have = sum(1 for name in running if name.startswith("ray-worker-"))
        per_worker = cpus_per_worker or max(1, (os.cpu_count() or 2) // max(1, workers))
        for index in range(have, workers):
            started.append(
                start_ray_worker(
                    state, stack["ray_address"], index, per_worker, host, stack.get("ray_auth_mode")
                )
            )
    except BaseException:
        for svc in started:
            svc.stop()
        raise
    stack["services"] += [s.to_dict() for s in started]
    write_stack(stack)
    return stack


def _dummy_aws_env() -> dict[str, str]:
    """moto accepts any credentials; real ones from the environment win."""
    return {
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "scalelab"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "scalelab"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


def _s3_artifacts_bucket(s3_url: str, bucket: str = "scalelab") -> str:
    import boto3

    env = _dummy_aws_env()
    client = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/mlartifacts"


def down(names: list[str] | None = None) -> list[Service]:
    """Stop the stack's processes (all, or those named) by pid; drop them from stack.json."""
    stack = read_stack()
    stopped, kept = [], []
    # worker nodes first, so they do not spend their last seconds reconnecting to a stopped head
    for svc in sorted(services_of(stack), key=lambda s: not s.name.startswith("ray-worker-")):
        if names and svc.name not in names and not (svc.name.startswith("ray-worker-") and "ray" in names):
            kept.append(svc)
            continue
        if pid_alive(svc.pid):
            svc.stop()
        stopped.append(svc)
        stack.pop(ADDRESS_KEYS.get(svc.name, ""), None)
        if svc.name == "ray":
            stack.pop("dashboard_url", None)
            stack.pop("ray_auth_mode", None)
            stack.pop("ray_logs", None)
            stack.pop("serve_ingress", None)
    stack["services"] = [s.to_dict() for s in kept]
    if kept:
        write_stack(stack)
    elif STACK_FILE.exists():
        STACK_FILE.unlink()
    return stopped


def status() -> list[dict[str, Any]]:
    stack = read_stack()
    rows = []
    for svc in services_of(stack):
        rows.append(
            {
                **svc.to_dict(),
                "alive": pid_alive(svc.pid),
                "address": stack.get(ADDRESS_KEYS.get(svc.name, "")),
            }
        )
    return rows
