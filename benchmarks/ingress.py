"""Ingress benchmark: Ray Serve's HAProxy ingress (scalelab's default) vs Ray's Python proxy.

The same app (scalelab's batched ``/v1/predict``, one 1-CPU replica) on a small model, so that the
ingress, not the model, bounds the figures: digits ``msresnet_tiny`` by default, untrained (the
answers do not matter here, the cost per request does). Each point is measured in a fresh process
with its own local Ray started with that ingress (``cluster.session.serve_ingress_env``: Serve reads
its constants once per process), and the two ingresses alternate in each round (``--rounds``,
default 3), so slow spells of a shared machine hit both; the figures are medians over the rounds.
Load comes from ``hey`` (compiled; ``make setup`` installs it): one base64 PNG per JSON request,
concurrency 1 and 32, for a fixed time per point. req/s counts 200 answers; p50/p99 are hey's.
Also recorded per point: the CPU that the ingress's own processes used (HAProxy ingress: the
``haproxy`` binary + Ray's proxy actor that manages it; Python proxy: the proxy actor), in cores
(CPU-seconds per second) and in CPU-ms per 1,000 answered requests, what they use idle (3 s, no
requests), and hey's own CPU (on a 2-core machine the client shares the cores).

    .venv/bin/python benchmarks/ingress.py [--rounds 3] [--duration 6] [--variant msresnet_tiny]
    .venv/bin/python benchmarks/ingress.py --quick     # 1 round, 1 s points: proves it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_figures  # noqa: E402
from serve import HEY, hey, png_json_body, serve_variant, test_image, untrained_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INGRESSES = ("haproxy", "proxy")
CONCURRENCY = (1, 32)
KEYS = ("rps", "p50_ms", "p99_ms", "failed", "client_cpu_s", "ingress_cpu_ms_per_1k", "ingress_cores")


def ingress_processes() -> list:
    """The processes that carry HTTP before it reaches a replica: Serve's proxy actor(s) and, with
    the HAProxy ingress, the ``haproxy`` binary it runs. Only this driver's own cluster (the local
    Ray it started: GCS, raylet, workers, haproxy all descend from it), never another on the machine."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
            text = " ".join(p.cmdline()) or name
        except psutil.Error:
            continue
        if "ProxyActor" in text or name.startswith("haproxy"):
            out.append(p)
    return out


def cpu_seconds(procs: list) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(ingress: str, bundle: Path, body_file: Path, duration: float) -> dict:
    """One point set (c=1, c=32) on a fresh local Ray with ``ingress``; runs in its own process."""
    os.environ["SCALELAB_SERVE_INGRESS"] = ingress
    import ray
    from ray import serve

    from scalelab.cluster.services import free_port
    from scalelab.cluster.session import serve_ingress_env

    os.environ.update(serve_ingress_env())  # the cluster's processes inherit it
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    figures: dict = {}
    try:
        url = serve_variant(bundle, port, True, "ingress")
        hey(url, body_file, 4, min(2.0, duration), "application/json")  # warm-up: connections, batches
        procs = ingress_processes()
        if not procs:
            raise RuntimeError(f"no ingress process found for {ingress} (ProxyActor / haproxy)")
        before, t0 = cpu_seconds(procs), time.perf_counter()
        time.sleep(min(3.0, duration))  # no requests: what the ingress costs by itself
        figures["idle_ingress_cores"] = round((cpu_seconds(procs) - before) / (time.perf_counter() - t0), 3)
        for c in CONCURRENCY:
            before = cpu_seconds(procs)
            r = hey(url, body_file, c, duration, "application/json")
            used = cpu_seconds(procs) - before
            r["ingress_cpu_ms_per_1k"] = round(1000 * 1000 * used / r["ok"], 1) if r["ok"] else None
            r["ingress_cores"] = round(used / r["wall_s"], 3) if r["wall_s"] else None
            figures.update({f"c{c}_{k}": r[k] for k in KEYS})
            print(
                f"{ingress:>8} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                f"failed {r['failed']}  ingress {r['ingress_cores']} cores "
                f"({r['ingress_cpu_ms_per_1k']} ms/1k)  "
                f"hey cpu {r['client_cpu_s']} s",
                file=sys.stderr,
                flush=True,
            )
        figures["ingress_processes"] = sorted({p.name() for p in procs})
    finally:
        serve.shutdown()
        ray.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; each measures both ingresses.")
    parser.add_argument("--duration", type=float, default=6.0, help="Measured seconds per point.")
    parser.add_argument("--variant", default="msresnet_tiny", help="The digits model served (default tiny).")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s points; figures to a temp file.")
    parser.add_argument(
        "--one", nargs=4, metavar=("INGRESS", "BUNDLE", "BODY", "DURATION"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        ingress, bundle, body, duration = args.one
        print(json.dumps(measure(ingress, Path(bundle), Path(body), float(duration))))
        return
    refuse_while_stack_runs()
    if not Path(HEY).exists():
        sys.exit("hey is not installed (`make setup`, or apt-get install hey)")
    rounds, duration = (1, 1.0) if args.quick else (args.rounds, args.duration)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="scalelab-bench-ingress-"))
    os.chdir(work)
    from scalelab.config import load_recipe

    spec = load_recipe(
        REPO / "pipelines" / "digits.yaml", [f"model.variant={args.variant}", "tracking.enabled=false"]
    )
    bundle = untrained_bundle(spec, work / "model")
    body_file = work / "body.json"
    body_file.write_bytes(png_json_body(test_image(bundle)))

    runs: dict[str, list[dict]] = {i: [] for i in INGRESSES}
    started = time.perf_counter()
    for r in range(rounds):
        order = INGRESSES if r % 2 == 0 else INGRESSES[::-1]
        for ingress in order:
            out = subprocess.run(
                [sys.executable, __file__, "--one", ingress, str(bundle), str(body_file), str(duration)],
                stdout=subprocess.PIPE,
                text=True,
                timeout=600,
            )
            if out.returncode != 0:
                sys.exit(f"the {ingress} round {r + 1} failed (exit {out.returncode}); see its output above")
            runs[ingress].append(json.loads(out.stdout.strip().splitlines()[-1]))

    figures: dict = {
        "dataset": "digits",
        "model_variant": args.variant,
        "weights": "untrained",
        "app": "scalelab /v1/predict, batched (max_batch_size 16), one 1-CPU replica, access log off",
        "load_generator": f"hey ({HEY}); -z {duration:g}s per point, keep-alive, a base64 PNG per JSON POST",
        "rounds": rounds,
        "duration_s": duration,
        "quick": args.quick,
        "note": "medians over rounds; each point on a fresh local Ray (2 CPUs) with that ingress; the "
        "two ingresses alternate per round; client, ingress and replica share the machine's cores",
    }
    for ingress in INGRESSES:
        figures[f"{ingress}_processes"] = runs[ingress][0]["ingress_processes"]
        figures[f"{ingress}_idle_ingress_cores"] = round(
            median([r["idle_ingress_cores"] for r in runs[ingress]]), 3
        )
        for c in CONCURRENCY:
            for k in KEYS:
                values = [run[f"c{c}_{k}"] for run in runs[ingress] if run[f"c{c}_{k}"] is not None]
                figures[f"{ingress}_c{c}_{k}"] = round(median(values), 2) if values else None
            figures[f"{ingress}_c32_rps_rounds"] = [run["c32_rps"] for run in runs[ingress]]
    for c in CONCURRENCY:
        if figures[f"proxy_c{c}_rps"]:
            figures[f"haproxy_vs_proxy_c{c}_rps_ratio"] = round(
                figures[f"haproxy_c{c}_rps"] / figures[f"proxy_c{c}_rps"], 2
            )
    figures["wall_seconds"] = round(time.perf_counter() - started, 1)
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_figures("ingress", figures, args.quick, work)


if __name__ == "__main__":
    main()
