"""Start and stop the local services scalelab relies on, as real processes we own by pid.

Used by ``scalelab up`` and by the test fixtures: an MLflow tracking server (SQL backend) and an
S3-compatible server (moto's server mode). Everything binds to 127.0.0.1 unless told otherwise.
Nothing here ever kills by name: a :class:`Service` stops exactly the process group it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from scalelab.config.settings import runtime_settings
from scalelab.errors import ScalelabError

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child counts as dead
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True

    def stop(self, timeout: float | None = None) -> None:
        """Terminate the session we started (the server, its workers, and what they spawned in
        process groups of their own, e.g. the HAProxy of Ray Serve's ingress), then reap.
        ``timeout`` (default ``SCALELAB_SERVICE_STOP_TIMEOUT_S``): the wait before SIGKILL."""
        timeout = timeout or runtime_settings().service_stop_timeout_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            members = session_members(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.time() + timeout
            while time.time() < deadline and (self.alive() or session_members(self.pid)):
                time.sleep(0.1)
            if not self.alive() and not session_members(self.pid):
                return

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def session_members(sid: int) -> list[int]:
    """Live processes (not zombies) of session ``sid``, other than its leader ``sid`` itself.
    Services start in a session of their own, so this is everything they left running, whatever
    process group or parent it has now."""
    import psutil

    members = []
    for pid in psutil.pids():
        if pid == sid:
            continue
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue  # gone meanwhile
    return members


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: str = "") -> None:
    settings = runtime_settings()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-2000:] if log and Path(log).exists() else ""
            raise ScalelabError(f"{url} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=settings.http_probe_timeout_s):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(settings.startup_poll_s)
    raise ScalelabError(f"{url} did not answer within {timeout:.0f}s (log: {log})")


def _spawn(name: str, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def start_mlflow_server(
    state_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    timeout: float | None = None,
    extra_env: dict | None = None,
) -> Service:
    """``mlflow server`` with a SQLite backend under ``state_dir`` (or ``backend_uri``).
    ``timeout``: default ``SCALELAB_MLFLOW_START_TIMEOUT_S``."""
    timeout = timeout or runtime_settings().mlflow_start_timeout_s
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    backend = backend_uri or f"sqlite:///{state / 'mlflow.db'}"
    artifacts = artifacts_destination or str(state / "mlartifacts")
    log = state / f"mlflow-{port}.log"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--workers",
        "1",
    ]
    return _start_http_service("mlflow", cmd, log, f"http://{host}:{port}", "/health", timeout, extra_env)


def start_s3_server(
    state_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, timeout: float | None = None
) -> Service:
    """moto's S3-compatible server on loopback (real HTTP, not an in-process mock).
    ``timeout``: default ``SCALELAB_S3_START_TIMEOUT_S``."""
    timeout = timeout or runtime_settings().s3_start_timeout_s
    state = Path(state_dir).resolve()
    port = port or free_port(host)
    log = state / f"s3-{port}.log"
    cmd = [str(BIN / "moto_server"), "-H", host, "-p", str(port)]
    return _start_http_service("s3", cmd, log, f"http://{host}:{port}", "/moto-api/", timeout)


def _start_http_service(
    name: str, cmd: list[str], log: Path, url: str, probe: str, timeout: float, env: dict | None = None
) -> Service:
    """Spawn ``cmd`` (its own process group), wait until ``url + probe`` answers, else stop it."""
    proc = _spawn(name, cmd, log, env)
    svc = Service(name, proc.pid, url, str(log))
    try:
        wait_http(f"{url}{probe}", timeout, proc, str(log))
    except ScalelabError:
        svc.stop()
        raise
    return svc


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on ``host:port`` or the port cannot be bound there."""
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as s:
        # as servers bind: connections of a stopped server in TIME_WAIT do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on TCP ``port``, when this user may see it.

    Linux only (``/proc/net/tcp*`` gives the listening socket's inode, ``/proc/PID/fd`` its owner);
    None elsewhere or when the holder belongs to another user.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")  # state 0A = LISTEN
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {proc.name} ({cmdline.strip()[:200]})"
        except OSError:  # gone meanwhile, or another user's
            continue
    return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...; Linux ``/proc``), whatever session
    or process group they made for themselves."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def terminate_processes(pids: list[int], grace_s: float = 2.0) -> None:
    """SIGTERM these processes at once, SIGKILL what is left after ``grace_s``. (A process tree is
    listed *before* its root goes: orphans are re-parented and no longer found below it.)"""
    procs = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for child in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_exists(p) for p in procs):
            time.sleep(0.1)
        procs = [p for p in procs if _exists(p)]
        if not procs:
            return


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # our own child that exited is reaped here (else it lingers as a zombie)
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: its parent (or init) reaps it
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)
    return True


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
