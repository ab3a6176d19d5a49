"""Serving benchmark: Ray Serve (batched, unbatched) vs bare FastAPI+uvicorn+torch; a swap under load.

All three serve the same model bundle (Fashion-MNIST ``msresnet_m`` by default: inference dominates)
with the same preprocessing (``scalelab.artifacts.preprocess``) and one torch thread each (a 1-CPU
replica; the bare app is one uvicorn process). Load comes from ``hey`` (a compiled client; ``make
setup`` installs it): one base64 PNG per JSON request at concurrency 1, 8, 32, 64 for a fixed time;
req/s counts 200 answers only, p50/p99 are hey's. The client's own CPU time (``getrusage`` of the
finished hey processes) is recorded per point: on a 2-core machine it is part of the story. Serve
runs on the default ingress (``cluster.session.serve_ingress_env``: HAProxy) unless ``--ingress
proxy``. Also: npy input (``application/x-npy``, a uint8 batch of one) at c=32; good requests
(c=4) during a flood of 100 slow-body connections; and, following ``@champion`` of an embedded
(SQLite) registry, a new version promoted under load at c=32 (failed requests counted; the time
split into the promotion gate, which evaluates both versions on the held-out test set in this
process, and the replica's pickup of the moved alias).

    .venv/bin/python benchmarks/serve.py [--bundle DIR] [--duration 6] [--ingress haproxy|proxy]
    .venv/bin/python benchmarks/serve.py --quick    # digits, tiny model, 1 s points: proves it runs
"""

import argparse
import base64
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_while_stack_runs, write_figures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
CONCURRENCY = (1, 8, 32, 64)
HEY = shutil.which("hey") or "/usr/bin/hey"


def pick_model(args) -> tuple[str, Path, dict]:
    """Fashion-MNIST ``msresnet_m`` where the dataset exists (trained here if no bundle is given),
    else digits; ``--quick``: digits ``msresnet_tiny``, one epoch."""
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    dataset = "fashion-mnist" if FASHION.is_dir() and not args.quick else "digits"
    if args.bundle:
        bundle = Path(args.bundle).resolve()
        info: dict = {"trained_here": False}
        if (bundle.parent / "metrics.json").is_file():  # written beside the bundle by `scalelab train`
            info["model_test_acc"] = json.loads((bundle.parent / "metrics.json").read_text()).get("test_acc")
        return dataset, bundle, info
    epochs = args.train_epochs or (1 if dataset == "fashion-mnist" or args.quick else 20)
    variant = "msresnet_tiny" if args.quick else ("msresnet_m" if dataset == "fashion-mnist" else None)
    overrides = ["tracking.enabled=false", "train.run_name=bench-serve", f"train.epochs={epochs}"]
    overrides += [f"model.variant={variant}"] if variant else []
    spec = load_recipe(REPO / "pipelines" / f"{dataset}.yaml", overrides)
    if args.untrained:
        return dataset, untrained_bundle(spec), {"trained_here": False, "weights": "untrained"}
    print(f"training the {dataset} model ({spec.model.variant}) for {epochs} epoch(s)...")
    outcome = run_training(spec)
    return (
        dataset,
        outcome.model_dir.resolve(),
        {"trained_here": True, "train_epochs": epochs, "model_test_acc": outcome.metrics["test_acc"]},
    )


def untrained_bundle(spec, out: Path | None = None) -> Path:
    """The recipe's model with its initial weights, in the precision training would use here: the same
    inference cost as a trained one (answers are meaningless; throughput figures only). Saved in
    ``out`` (default: ``outputs/bench-serve-untrained/model``, which predict.py reuses)."""
    from scalelab.artifacts.bundle import save_model_bundle
    from scalelab.data.catalog import load_dataset
    from scalelab.models import build_model
    from scalelab.train.loop import bundle_meta
    from scalelab.train.runtime import select_runtime

    data = load_dataset(spec.data)
    x = data.splits["train"].x
    chans = 1 if x.ndim == 3 else x.shape[-1]
    model = build_model(spec.model, chans, len(data.classes), x.shape[1])
    out = out or REPO / "outputs" / "bench-serve-untrained" / "model"
    return save_model_bundle(model, out, bundle_meta(spec, data, select_runtime(spec.train)))


def test_image(bundle: Path) -> np.ndarray:
    from scalelab.artifacts.bundle import read_bundle_meta
    from scalelab.config.specs import DataSpec
    from scalelab.data.catalog import load_dataset

    meta = read_bundle_meta(bundle)
    return load_dataset(DataSpec.model_validate(meta["recipe"]["data"])).splits["test"].x[0]  # (H, W, C)


def png_json_body(x: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format="PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()


def npy_body(x: np.ndarray) -> bytes:
    """The ``application/x-npy`` contract (serve/app.py): a uint8 batch (N, H, W, C), here N = 1."""
    buf = io.BytesIO()
    np.save(buf, x[None].astype(np.uint8), allow_pickle=False)
    return buf.getvalue()


def hey(url: str, body_file: Path, concurrency: int, duration: float, content_type: str) -> dict:
    """One ``hey`` run: 200 answers per second, p50/p99, failures, and hey's own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [HEY, "-z", f"{duration}s", "-c", str(concurrency), "-m", "POST", "-T", content_type]
    out = subprocess.run(
        [*cmd, "-D", str(body_file), url], capture_output=True, text=True, timeout=duration + 120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return parse_hey(out.stdout) | {
        "client_cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)
    }


def parse_hey(text: str) -> dict:
    total = float(m.group(1)) if (m := re.search(r"Total:\s+([\d.]+) secs", text)) else 0.0
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors = (
        sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s+\S", text.split("Error distribution:")[-1], re.M))
        if "Error distribution:" in text
        else 0
    )
    pct = {int(p): float(v) * 1000 for p, v in re.findall(r"(\d+)% in ([\d.]+) secs", text)}
    ok = codes.get(200, 0)
    return {
        "rps": round(ok / total, 1) if total else 0.0,
        "p50_ms": round(pct[50], 2) if 50 in pct else None,
        "p99_ms": round(pct[99], 2) if 99 in pct else None,
        "ok": ok,
        "failed": sum(n for c, n in codes.items() if c != 200) + errors,
        "wall_s": total,
    }


def sweep(label: str, url: str, body_file: Path, duration: float, figures: dict, ctype: str) -> None:
    hey(url, body_file, 4, min(1.0, duration), ctype)  # warm-up: connections, first batches
    for c in CONCURRENCY:
        r = hey(url, body_file, c, duration, ctype)
        for key in ("rps", "p50_ms", "p99_ms", "failed", "client_cpu_s"):
            figures[f"{label}_c{c}_{key}"] = r[key]
        print(
            f"{label:>9} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
            f"failed {r['failed']}  hey cpu {r['client_cpu_s']} s",
            flush=True,
        )


def slow_body_flood(url: str, body_file: Path, duration: float, n: int = 100) -> dict:
    """``n`` loopback connections send a POST's headers and 10 bytes of a 100 kB body and hold,
    while hey sends good requests at c=4; the flood is bounded by ``duration`` (and the ingress's
    client timeout, which may cut it sooner)."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    path = url.split(f":{port}", 1)[1]
    held = []
    try:
        for _ in range(n):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f'Content-Length: 100000\r\n\r\n{{"images":'.encode()
            )
            held.append(sock)
        r = hey(url, body_file, 4, duration, "application/json")
    finally:
        for sock in held:
            sock.close()
    return {
        "slow_body_flood_connections": n,
        "slow_body_flood_good_rps": r["rps"],
        "slow_body_flood_good_p99_ms": r["p99_ms"],
        "slow_body_flood_good_failed": r["failed"],
    }


def serve_variant(bundle: Path, port: int, batching: bool, app: str, max_batch_size: int = 16) -> str:
    from ray import serve

    from scalelab.config.specs import ServeSpec
    from scalelab.serve.commands import wait_ready
    from scalelab.serve.deploy import build_application

    spec = ServeSpec(
        port=port,
        batching=batching,
        cpus_per_replica=1,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=0.002,
        max_ongoing_requests=128,
        max_queued_requests=-1,
        access_log=False,  # the bare app logs no requests either
    )
    args = {"bundle_path": str(bundle), "serve": spec.model_dump(), "include_key": False}
    serve.run(build_application(args), name=app, route_prefix=f"/{app}")
    wait_ready(f"http://127.0.0.1:{port}/{app}", 120)  # the app's route, not the port (HAProxy: 404 first)
    return f"http://127.0.0.1:{port}/{app}/v1/predict"


def bare_server(bundle: str, port: int) -> None:
    """What a user would write instead: FastAPI + uvicorn + torch, same preprocessing, one process."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from scalelab.artifacts.predictor import Predictor
    from scalelab.artifacts.preprocess import decode_base64

    torch.set_num_threads(1)
    predictor = Predictor.from_bundle(bundle)
    app = FastAPI()

    class Body(BaseModel):
        images: list[str]

    @app.post("/v1/predict")
    def predict(body: Body) -> dict:
        images = np.stack([decode_base64(s, predictor.input, 16_000_000) for s in body.images])
        return {"predictions": predictor.top_k(predictor.predict_proba(images), 5)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def swap_under_load(bundle: Path, port: int, body_file: Path, work: Path, duration: float) -> dict:
    """Follow @champion of an embedded registry, promote a second version while hey runs at c=32."""
    import httpx
    from ray import serve

    from scalelab.config.specs import ServeSpec
    from scalelab.registry.promote import promote
    from scalelab.registry.register import log_bundle_run, register_run
    from scalelab.serve.deploy import build_application
    from scalelab.tracking.bundles import connect

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = connect(uri)
    versions = [
        str(register_run(client, log_bundle_run(client, bundle, run_name=f"bench-{i}"), name="bench").version)
        for i in range(2)
    ]
    # a scratch folder: no DVC, so the data is unversioned; the gate's other checks stay on
    loose = {"latency_p95_ms": 1e6, "min_accuracy": 0.0, "allow_unversioned_data": True}
    first = promote(client, "bench", version=versions[0], policy=loose)
    if not first.moved:
        raise RuntimeError(f"promotion of the first version refused: {first.reasons}")
    spec = ServeSpec(
        port=port,
        cpus_per_replica=1,
        max_ongoing_requests=128,
        max_queued_requests=-1,
        poll_interval_s=0.5,
        access_log=False,
    )
    serve.run(
        build_application(
            {"model": "bench", "tracking_uri": uri, "serve": spec.model_dump(), "include_key": False}
        ),
        name="swap",
        route_prefix="/swap",
    )
    base = f"http://127.0.0.1:{port}/swap"
    # hey runs until the SIGINT below, however long the gate takes (a fixed -z once ended the load
    # before the swap on a slow host, so part of the swap went unmeasured)
    cmd = [HEY, "-z", "3600s", "-c", "32", "-m", "POST", "-T", "application/json"]
    loader = subprocess.Popen(
        [*cmd, "-D", str(body_file), f"{base}/v1/predict"], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(2.0)
        started = time.perf_counter()
        # The gate runs under load too: it evaluates both versions on the whole held-out test set here
        # (2 x 10,000 Fashion-MNIST images: minutes on an AVX2-only host), then moves the alias.
        outcome = promote(client, "bench", version=versions[1], policy=loose)
        moved = time.perf_counter()
        if not outcome.moved:
            raise RuntimeError(f"promotion refused: {outcome.reasons}")
        deadline = time.time() + 120
        while httpx.get(f"{base}/v1/model", timeout=10).json()["version"] != versions[1]:
            if time.time() > deadline:
                raise RuntimeError("the replica did not pick up the new champion within 120 s")
            time.sleep(0.1)
        served = time.perf_counter()
        time.sleep(2.0)
    finally:
        loader.send_signal(signal.SIGINT)  # hey stops and prints its summary
        out, _ = loader.communicate(timeout=60)
    serve.delete("swap")
    r = parse_hey(out)
    return {
        "swap_failed_requests": r["failed"],
        "swap_total_requests": r["ok"] + r["failed"],
        "swap_seconds_promote_to_served": round(served - started, 2),
        "swap_gate_seconds": round(moved - started, 2),  # promote(): gate + alias move, in this process
        "swap_seconds_alias_to_served": round(served - moved, 2),  # the replica's poll + load + swap
    }


def npy_point(
    bundle: Path, port: int, x: np.ndarray, work: Path, duration: float, max_batch_size: int
) -> dict:
    """``batched_npy_c32_*``: the batched app fed ``application/x-npy`` (the uint8 batch contract)."""
    import httpx

    url = serve_variant(bundle, port, True, "npy", max_batch_size)
    body_file = work / "body.npy"
    body_file.write_bytes(npy_body(x))
    probe = httpx.post(
        url, content=body_file.read_bytes(), headers={"content-type": "application/x-npy"}, timeout=60
    )
    if probe.status_code != 200:
        return {
            "batched_npy_c32_rps": None,
            "batched_npy_note": f"HTTP {probe.status_code}: {probe.text[:200]}",
        }
    r = hey(url, body_file, 32, duration, "application/x-npy")
    print(f"npy c=32 {r['rps']:>8.1f} req/s  p99 {r['p99_ms']} ms  failed {r['failed']}", flush=True)
    return {
        "batched_npy_c32_rps": r["rps"],
        "batched_npy_c32_p99_ms": r["p99_ms"],
        "batched_npy_c32_failed": r["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", help="Model bundle folder (default: train the dataset's model).")
    parser.add_argument("--train-epochs", type=int, help="Epochs when training here (fashion 1, digits 20).")
    parser.add_argument("--duration", type=float, default=6.0, help="Measured seconds per point.")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="Serve the model with its initial weights instead of training one epoch (same cost per "
        "request; answers meaningless). Recorded as weights=untrained.",
    )
    parser.add_argument(
        "--ingress", choices=("haproxy", "proxy"), help="Serve's ingress (default: scalelab's)."
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="The batched variant's max_batch_size (default 16; 32 until 2026-11-30). At c=32 with 32, "
        "every client sits in one batch and the model waits out each round trip (py-spy: its thread "
        "idle 35%% of the time; 20%% with 16 on a loaded machine); 16 keeps two batches in flight.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Prove it runs: digits, tiny model, 1 s points; "
        "figures go to a temp file, not benchmarks/results/.",
    )
    parser.add_argument("--bare-server", nargs=2, metavar=("BUNDLE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(args.bare_server[0], int(args.bare_server[1]))
    refuse_while_stack_runs()
    if not Path(HEY).exists():
        sys.exit("hey is not installed (`make setup`, or apt-get install hey)")
    duration = 1.0 if args.quick else args.duration
    if args.ingress:
        os.environ["SCALELAB_SERVE_INGRESS"] = args.ingress

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="scalelab-bench-serve-"))
    os.chdir(work)  # data/, outputs/, the registry: all in a scratch folder
    _, bundle, model_info = pick_model(args)
    x = test_image(bundle)
    body_file = work / "body.json"
    body_file.write_bytes(png_json_body(x))

    import httpx
    import ray
    from ray import serve

    from scalelab.artifacts.bundle import read_bundle_meta
    from scalelab.cluster.services import free_port, wait_http
    from scalelab.cluster.session import serve_ingress, serve_ingress_env

    meta = read_bundle_meta(bundle)
    ingress_env = serve_ingress_env()
    figures: dict = {
        "dataset": meta["dataset"]["name"],
        "model_variant": meta["recipe"]["model"].get("variant"),
        "input": meta["dataset"]["shape"],
        **model_info,
        "ingress": serve_ingress(),
        "batched_max_batch_size": args.max_batch_size,
        "ingress_env": {k: v for k, v in ingress_env.items() if not k.endswith("_PORT") and "/" not in v},
        "load_generator": f"hey ({HEY}); -z {duration:g}s per point, keep-alive, POST from a file",
        "duration_s": duration,
        "quick": args.quick,
        "note": "load generator on the same machine (client_cpu_s: hey's own CPU per point); one torch "
        "thread per server (1-CPU Serve replica + Serve ingress vs one uvicorn process)",
    }
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", str(bundle), str(bare_port)], start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{bare_port}/docs", 120, bare)
        sweep(
            "bare",
            f"http://127.0.0.1:{bare_port}/v1/predict",
            body_file,
            duration,
            figures,
            "application/json",
        )
    finally:
        os.killpg(bare.pid, signal.SIGTERM)
        bare.wait(timeout=30)

    os.environ.update(ingress_env)  # the cluster's processes inherit it
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        for label, batching in (("batched", True), ("unbatched", False)):
            url = serve_variant(bundle, port, batching, label, args.max_batch_size)
            httpx.post(
                url, content=body_file.read_bytes(), headers={"content-type": "application/json"}, timeout=60
            )
            sweep(label, url, body_file, duration, figures, "application/json")
            if batching:
                figures.update(slow_body_flood(url, body_file, duration=min(max(duration, 1.0), 8.0)))
                print(
                    f"slow-body flood: good p99 {figures['slow_body_flood_good_p99_ms']} ms, "
                    f"failed {figures['slow_body_flood_good_failed']}",
                    flush=True,
                )
            serve.delete(label)
        figures.update(npy_point(bundle, port, x, work, duration, args.max_batch_size))
        serve.delete("npy")
        figures.update(swap_under_load(bundle, port, body_file, work, duration))
        print(
            f"swap: {figures['swap_failed_requests']} failed of {figures['swap_total_requests']}; "
            f"gate {figures['swap_gate_seconds']} s, alias moved to served "
            f"{figures['swap_seconds_alias_to_served']} s",
            flush=True,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # how shared the machine was
    for other in ("bare", "unbatched"):
        if figures.get(f"{other}_c32_rps"):
            figures[f"batched_vs_{other}_c32_rps_ratio"] = round(
                figures["batched_c32_rps"] / figures[f"{other}_c32_rps"], 2
            )
    write_figures("serve", figures, args.quick, work)


if __name__ == "__main__":
    main()
