"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

from scalelab.cluster.session import pid_alive

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def conv_peak_gflops(bf16: bool) -> float:
    """Measured peak of a 3x3 conv, 64->64 ch, 16x16, batch 256, channels_last (DESIGN.md's probe):
    the denominator of the MFU figures (model FLOPs utilisation) of digits.py and fashion_speed.py."""
    import time

    import torch

    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(256, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    flops = 2 * 256 * 64 * 64 * 9 * 16 * 16
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(8):
            t = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - t)
    return flops / median(times[2:]) / 1e9


def write_results(name: str, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**figures, **machine()}, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path


def write_figures(name: str, figures: dict, quick: bool, scratch: Path | None = None) -> Path:
    """``benchmarks/results/<name>.json``, or for a ``--quick`` run (it proves the script runs; its
    figures mean nothing) ``<name>-quick.json`` in ``scratch`` (default: a new temp folder)."""
    if not quick:
        return write_results(name, figures)
    import tempfile

    folder = scratch or Path(tempfile.mkdtemp(prefix=f"scalelab-bench-{name}-"))
    path = folder / f"{name}-quick.json"
    path.write_text(json.dumps({**figures, **machine()}, indent=2) + "\n")
    print(f"quick run: wrote {path} (not benchmarks/results/)")
    return path


ALLOW_STACK_ENV = "SCALELAB_BENCH_WITH_STACK"  # =1: run anyway (figures flagged, a loud warning)


def running_stacks(folders: list[Path] | None = None) -> list[tuple[Path, list[str]]]:
    """Scalelab stacks (``.scalelab/stack.json`` with live pids) in the repo and the cwd."""
    repo = Path(__file__).resolve().parents[1]
    found = []
    for folder in dict.fromkeys(folders or [repo, Path.cwd()]):
        stack_file = folder / ".scalelab" / "stack.json"
        try:
            services = json.loads(stack_file.read_text()).get("services", [])
        except (OSError, ValueError):
            continue
        live = [f"{s['name']} (pid {s['pid']})" for s in services if _live(s.get("pid"))]
        if live:
            found.append((stack_file, live))
    return found


def _live(pid: object) -> bool:
    try:
        pid = int(pid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return pid > 0 and pid_alive(pid)  # pid 0 would be our own process group


def refuse_while_stack_runs(folders: list[Path] | None = None) -> None:
    """Refuse to measure while a scalelab stack runs: an idle Ray head with Serve (controller,
    proxy, replica, GCS, log monitor, dashboard) takes ~0.2 of a core here and slows every figure.
    ``SCALELAB_BENCH_WITH_STACK=1`` runs anyway, with the warning."""
    stacks = running_stacks(folders)
    if not stacks:
        return
    lines = [f"  {path}: {', '.join(live)}" for path, live in stacks]
    message = "\n".join(
        [
            "!" * 78,
            "A scalelab stack is running; its idle Ray head + Serve take ~0.2 of a core and skew timings:",
            *lines,
            "Stop it first (`make down` or `scalelab down` in that folder), or set "
            f"{ALLOW_STACK_ENV}=1 to measure anyway.",
            "!" * 78,
        ]
    )
    print(message, file=sys.stderr, flush=True)
    if os.environ.get(ALLOW_STACK_ENV) != "1":
        raise SystemExit(2)
