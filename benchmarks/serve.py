"""Serving benchmark: Ray Serve (batched, unbatched) vs bare FastAPI+uvicorn+torch; a swap under load.

All three serve the same model bundle with the same preprocessing (``scalelab.artifacts.preprocess``) and
one torch thread each (a 1-CPU replica; the bare app is one uvicorn process). A small asyncio/httpx
client posts one base64 PNG per request at concurrency 1, 8, 32, 64 for a fixed time and records
req/s and p50/p99 latency. Then, with the batched app following ``@champion`` of an embedded
(SQLite) registry, a new version is promoted under load at concurrency 32 and failed requests are
counted. The load generator runs on the same (shared, 2-core) machine: quote ratios, not absolutes.

    .venv/bin/python benchmarks/serve.py [--bundle DIR] [--duration 6]
"""

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_while_stack_runs, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
CONCURRENCY = (1, 8, 32, 64)


def pick_model(args) -> tuple[str, Path, dict]:
    """The Fashion-MNIST default model where the dataset exists (trained here if none given), else digits."""
    from scalelab.config import load_recipe
    from scalelab.train.api import run_training

    dataset = "fashion-mnist" if FASHION.is_dir() else "digits"
    if args.bundle:
        bundle = Path(args.bundle).resolve()
        info: dict = {"trained_here": False}
        if (bundle.parent / "metrics.json").is_file():  # written beside the bundle by `scalelab train`
            info["model_test_acc"] = json.loads((bundle.parent / "metrics.json").read_text()).get("test_acc")
        return dataset, bundle, info
    epochs = args.train_epochs or (1 if dataset == "fashion-mnist" else 20)
    overrides = ["tracking.enabled=false", "train.run_name=bench-serve", f"train.epochs={epochs}"]
    spec = load_recipe(REPO / "pipelines" / f"{dataset}.yaml", overrides)
    print(f"training the {dataset} default model ({spec.model.variant}) for {epochs} epoch(s)...")
    outcome = run_training(spec)
    return (
        dataset,
        outcome.model_dir.resolve(),
        {
            "trained_here": True,
            "train_epochs": epochs,
            "model_test_acc": outcome.metrics["test_acc"],
        },
    )


def request_body(bundle: Path) -> bytes:
    from PIL import Image

    from scalelab.artifacts.bundle import read_bundle_meta
    from scalelab.config.specs import DataSpec
    from scalelab.data.catalog import load_dataset

    meta = read_bundle_meta(bundle)
    x = load_dataset(DataSpec.model_validate(meta["recipe"]["data"])).splits["test"].x[0]
    buf = io.BytesIO()
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format="PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()


async def load(url: str, body: bytes, concurrency: int, duration: float, warmup: float = 1.0) -> dict:
    import httpx

    lat: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + duration

        async def worker() -> None:
            nonlocal failed
            while (now := time.perf_counter()) < stop:
                try:
                    r = await http.post(url, content=body, headers={"content-type": "application/json"})
                    ok = r.status_code == 200
                except Exception:  # noqa: BLE001 - a dropped connection counts as a failure
                    ok = False
                if now >= measure_from:
                    if ok:
                        lat.append((time.perf_counter() - now) * 1000)
                    else:
                        failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "rps": round(len(lat) / duration, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
        "failed": failed,
        "ok": len(lat),
    }


def sweep(label: str, url: str, body: bytes, duration: float, figures: dict) -> None:
    for c in CONCURRENCY:
        r = asyncio.run(load(url, body, c, duration))
        figures[f"{label}_c{c}_rps"] = r["rps"]
        figures[f"{label}_c{c}_p50_ms"] = r["p50_ms"]
        figures[f"{label}_c{c}_p99_ms"] = r["p99_ms"]
        figures[f"{label}_c{c}_failed"] = r["failed"]
        print(
            f"{label:>9} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
            f"failed {r['failed']}",
            flush=True,
        )


def serve_variant(bundle: Path, port: int, batching: bool, app: str) -> str:
    from ray import serve

    from scalelab.config.specs import ServeSpec
    from scalelab.serve.deploy import build_application

    spec = ServeSpec(
        port=port,
        batching=batching,
        cpus_per_replica=1,
        max_batch_size=32,
        batch_wait_timeout_s=0.002,
        max_ongoing_requests=128,
        max_queued_requests=-1,
        access_log=False,  # the bare app logs no requests either
    )
    args = {"bundle_path": str(bundle), "serve": spec.model_dump(), "include_key": False}
    serve.run(build_application(args), name=app, route_prefix=f"/{app}")
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


def swap_under_load(bundle: Path, port: int, body: bytes, work: Path) -> dict:
    """Follow @champion of an embedded registry, promote a second version at concurrency 32."""
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
    loose = {"latency_p95_ms": 1e6, "min_accuracy": 0.0}
    promote(client, "bench", version=versions[0], policy=loose)
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
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}

    async def until_stopped() -> None:
        async with httpx.AsyncClient(timeout=60) as http:

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        r = await http.post(
                            f"{base}/v1/predict", content=body, headers={"content-type": "application/json"}
                        )
                        counts["ok" if r.status_code == 200 else "failed"] += 1
                    except Exception:  # noqa: BLE001 - a dropped connection is a failed request
                        counts["failed"] += 1

            await asyncio.gather(*(worker() for _ in range(32)))

    loader = threading.Thread(target=lambda: asyncio.run(until_stopped()))
    loader.start()
    time.sleep(2.0)
    started = time.perf_counter()
    outcome = promote(client, "bench", version=versions[1], policy=loose)  # the gate runs under load too
    if not outcome.moved:
        stop.set()
        raise RuntimeError(f"promotion refused: {outcome.reasons}")
    deadline = time.time() + 120
    while httpx.get(f"{base}/v1/model", timeout=10).json()["version"] != versions[1]:
        if time.time() > deadline:
            stop.set()
            raise RuntimeError("the replica did not pick up the new champion within 120 s")
        time.sleep(0.1)
    swapped_after = time.perf_counter() - started
    time.sleep(2.0)
    stop.set()
    loader.join()
    serve.delete("swap")
    return {
        "swap_failed_requests": counts["failed"],
        "swap_total_requests": counts["ok"] + counts["failed"],
        "swap_seconds_promote_to_served": round(swapped_after, 2),
    }


def main() -> None:
    refuse_while_stack_runs()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", help="Model bundle folder (default: train the dataset's default model).")
    parser.add_argument("--train-epochs", type=int, help="Epochs when training here (fashion 1, digits 20).")
    parser.add_argument("--duration", type=float, default=6.0, help="Measured seconds per point.")
    parser.add_argument("--bare-server", nargs=2, metavar=("BUNDLE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(args.bare_server[0], int(args.bare_server[1]))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="scalelab-bench-serve-"))
    os.chdir(work)  # data/, outputs/, the registry: all in a scratch folder
    _, bundle, model_info = pick_model(args)
    body = request_body(bundle)

    import httpx
    import ray
    from ray import serve

    from scalelab.artifacts.bundle import read_bundle_meta
    from scalelab.cluster.services import free_port, wait_http

    meta = read_bundle_meta(bundle)
    dataset = meta["dataset"]["name"]
    figures: dict = {
        "dataset": dataset,
        "model_variant": meta["recipe"]["model"].get("variant"),
        "input": meta["dataset"]["shape"],
        **model_info,
        "note": "shared 2-core machine; load generator on the same machine; one torch thread per "
        "server (1-CPU Serve replica + Serve proxy vs one uvicorn process)",
    }
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", str(bundle), str(bare_port)], start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{bare_port}/docs", 120, bare)
        sweep("bare", f"http://127.0.0.1:{bare_port}/v1/predict", body, args.duration, figures)
    finally:
        os.killpg(bare.pid, 15)
        bare.wait(timeout=30)

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for label, batching in (("batched", True), ("unbatched", False)):
            url = serve_variant(bundle, port, batching, label)
            httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
            sweep(label, url, body, args.duration, figures)
            serve.delete(label)
        figures.update(swap_under_load(bundle, port, body, work))
        print(f"swap: {figures['swap_failed_requests']} failed of {figures['swap_total_requests']}")
    finally:
        serve.shutdown()
        ray.shutdown()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # how shared the machine was
    figures["batched_vs_bare_c32_rps_ratio"] = round(figures["batched_c32_rps"] / figures["bare_c32_rps"], 2)
    figures["batched_vs_unbatched_c32_rps_ratio"] = round(
        figures["batched_c32_rps"] / figures["unbatched_c32_rps"], 2
    )
    write_results("serve", figures)


if __name__ == "__main__":
    main()
