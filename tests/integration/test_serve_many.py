"""Many models on one cluster, a port that is taken, SIGTERM, and a slow-body flood (issue 16).

Real Ray Serve behind the default ingress (HAProxy, `cluster.session.serve_ingress_env`), real HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from scalelab.cluster.services import free_port
from scalelab.registry.promote import promote
from scalelab.registry.register import log_bundle_run, register_run
from scalelab.tracking.bundles import connect

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
LOOSE = {"latency_p95_ms": 5000.0}
JSON = {"content-type": "application/json"}


def png_body(x: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format="PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()


def test_two_models_on_one_cluster_each_on_its_own_route(
    local_ray, mlflow_server, digits_bundles, tmp_path, monkeypatch
):
    """`deploy` twice into one Serve: each app answers on its own prefix with its own version; `serve
    list` shows both; `serve stop` of one leaves the other serving."""
    from ray import serve

    from scalelab.serve.commands import deploy, list_served, serve_details, stop_served

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = connect(mlflow_server.url)
    first, second = f"many-a-{uuid.uuid4().hex[:5]}", f"many-b-{uuid.uuid4().hex[:5]}"
    run_good = log_bundle_run(client, digits_bundles["good"]["dir"], run_name=first)
    register_run(client, run_good, name=first)
    assert promote(client, first, version="1", policy=LOOSE).moved
    for label in ("good", "better"):  # the second model's champion is its version 2
        register_run(
            client, log_bundle_run(client, digits_bundles[label]["dir"], run_name=label), name=second
        )
    assert promote(client, second, version="2", policy=LOOSE).moved

    port = free_port()
    overrides = [f"serve.port={port}", "serve.max_ongoing_requests=8"]
    a = deploy(first, overrides, tracking_uri=mlflow_server.url)
    b = deploy(second, overrides, tracking_uri=mlflow_server.url)
    try:
        http = (serve_details() or {})["http_options"]
        assert a.url != b.url and b.url.endswith(f"/{second}")
        for dep, name, version in ((a, first, "1"), (b, second, "2")):
            assert f":{http['port']}" in dep.url
            info = httpx.get(f"{dep.url}/v1/model", timeout=30).json()
            assert (info["name"], str(info["version"])) == (name, version)
            from scalelab.artifacts.bundle import read_bundle_meta
            from scalelab.registry.gate import load_test_split

            x, y, _ = load_test_split(read_bundle_meta(digits_bundles["good"]["dir"]))
            r = httpx.post(f"{dep.url}/v1/predict", content=png_body(x[0]), headers=JSON, timeout=30)
            assert r.status_code == 200 and r.json()["model"]["version"] == version
        assert httpx.get(f"{b.url}/", timeout=30).status_code == 200  # its demo page, under /NAME/

        list_served()  # prints; the Python side is what it reads
        apps = serve_details()["applications"]
        assert {a.app, b.app} <= set(apps)

        started = time.monotonic()
        stop_served(second)
        assert time.monotonic() - started < 15
        assert b.app not in serve_details()["applications"]
        deadline = time.time() + 15
        while httpx.get(f"{b.url}/readyz", timeout=10).status_code == 200 and time.time() < deadline:
            time.sleep(0.3)
        assert httpx.get(f"{b.url}/readyz", timeout=10).status_code != 200
        assert httpx.get(f"{a.url}/readyz", timeout=10).status_code == 200  # the other keeps serving
        assert httpx.get(f"{a.url}/v1/model", timeout=10).json()["name"] == first
    finally:
        for app in (a.app, b.app):
            serve.delete(app, _blocking=False)


def test_a_port_held_by_another_process_is_refused_naming_it(tmp_path):
    """A second `scalelab serve` on a taken port stops before starting anything, naming the holder."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "RAY_ADDRESS": "local"}
        out = subprocess.run(
            [str(BIN / "scalelab"), "serve", "whatever", "--bundle", str(tmp_path), f"serve.port={port}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert f"port {port}" in text and f"pid {os.getpid()}" in text, text


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, grandchildren, ...), whatever session they made."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for row in rows:
        if row.strip():
            p, pp = map(int, row.split())
            children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> list[str]:
    out = []
    for p in pids:
        try:
            os.kill(p, 0)
            out.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (ProcessLookupError, FileNotFoundError):
            continue
    return out


def slow_body_flood(host: str, port: int, path: str, n: int) -> list[socket.socket]:
    """``n`` connections that send a POST's headers and 10 bytes of a 100 kB body, then hold."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f'Content-Length: 100000\r\n\r\n{{"images":'.encode()
        )
        socks.append(s)
    return socks


def trickle(port: int, answer: list[bytes], limit_s: float = 12.0) -> None:
    """A POST whose body comes one byte every 0.5 s; what the server answers goes into ``answer``."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        s.sendall(b"Content-Length: 100000\r\n\r\n")
        s.setblocking(False)
        until = time.monotonic() + limit_s
        while time.monotonic() < until:
            try:
                data = s.recv(4096)
                answer.append(data)
                return
            except BlockingIOError:
                pass
            with contextlib.suppress(OSError):  # closed after the answer: read it on the next turn
                s.send(b" ")
            time.sleep(0.5)


def test_flood_of_slow_bodies_and_sigterm(digits_bundles, tmp_path):
    """`scalelab serve` (its own Ray, HAProxy ingress): good requests are answered while 100
    connections hold unfinished bodies and one trickles its body (408 at the body deadline);
    SIGTERM stops it within seconds, leaving no process behind."""
    from scalelab.artifacts.bundle import read_bundle_meta
    from scalelab.registry.gate import load_test_split

    port = free_port()
    bundle = digits_bundles["good"]["dir"]
    env = {**os.environ, "RAY_ADDRESS": "local", "SCALELAB_SERVE_CLIENT_TIMEOUT_S": "5"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *(str(BIN / "scalelab"), "serve", "flood", "--bundle", str(bundle)),
            *(f"serve.port={port}", "serve.body_timeout_s=3"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its session id finds every process it started
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            if "serving" in (tmp_path / "serve.log").read_text():
                break
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # ready means the app's route

        x, _, _ = load_test_split(read_bundle_meta(bundle))
        body = png_body(x[0])
        held = slow_body_flood("127.0.0.1", port, "/v1/predict", 100)
        trickled: list[bytes] = []  # a byte every 0.5 s: never idle for the ingress's 5 s timeout
        trickler = threading.Thread(target=trickle, args=(port, trickled), daemon=True)
        trickler.start()
        latencies, codes = [], []
        try:
            with httpx.Client(timeout=10) as http:
                until = time.monotonic() + 6
                while time.monotonic() < until:
                    t = time.perf_counter()
                    codes.append(http.post(f"{url}/v1/predict", content=body, headers=JSON).status_code)
                    latencies.append((time.perf_counter() - t) * 1000)
        finally:
            for s in held:
                s.close()
            trickler.join(timeout=15)
        assert codes and set(codes) == {200}, codes
        # cut by the replica's whole-body deadline (serve.body_timeout_s=3), not left holding a slot
        assert trickled and trickled[0].startswith(b"HTTP/1.1 408"), trickled
        assert float(np.percentile(latencies, 99)) < 2000, latencies  # loose: a shared, loaded machine
    finally:
        tree = descendants(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            log.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stopped_after = time.monotonic() - started
    assert stopped_after < 10, f"SIGTERM took {stopped_after:.1f}s"
    deadline = time.time() + 5  # killed processes may take a moment to be reaped by init
    while alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    assert len(tree) > 3 and not alive(tree), alive(tree)  # raylet, GCS, workers, HAProxy: all gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nobody answers on the port any more
