"""A small step runner for `scalelab pipeline run`: skip what is done, resume from a step.

Each step declares a fingerprint of its inputs (the recipe sections it reads plus the outputs
of the steps before it). A step whose fingerprint matches the last successful run, and whose
outputs still exist, is skipped. State lives in ``.scalelab/pipeline/<recipe name>/state.json``
(in the recipe's project) and is written after each step, atomically.

This digest is the one thing that decides what is stale on the pipeline's path, for all eight
steps; ``dvc.yaml`` does not describe these steps. Why not DVC for the whole path: five of the
eight steps produce no file DVC could hash (a registry version, an alias moved by the promotion
gate, a live Serve deployment checked by ``/readyz``, an HTTP smoke test, a report logged to
MLflow), and the pipeline must also run where there is no DVC repository (a content hash then
stands for the data version). ``dvc.yaml`` is DVC's own, separate path over files only (prepare
-> train the recipe as written -> evaluate, for ``dvc repro`` / ``dvc exp`` / ``dvc metrics``):
its stages call the same verbs, but neither path reads the other's record of what is done.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import ScalelabError


class StepFailed(ScalelabError):
    """A pipeline step failed; the message names the step, the cause and how to rerun."""


@dataclass
class Step:
    name: str
    run: Callable[[dict[str, Any]], dict[str, Any]]  # outputs of earlier steps -> this step's outputs
    fingerprint: Callable[[dict[str, Any]], Any]  # what, if changed, makes the step rerun
    done: Callable[[dict[str, Any]], bool] = field(default=lambda outputs: True)  # outputs still exist?
    description: str = ""


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PipelineState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, step: str) -> dict[str, Any] | None:
        return self.data.get(step)

    def record(self, step: str, fingerprint: str, outputs: dict[str, Any], seconds: float) -> None:
        self.data[step] = {
            "fingerprint": fingerprint,
            "outputs": outputs,
            "seconds": seconds,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def forget_from(self, steps: list[str]) -> None:
        for s in steps:
            self.data.pop(s, None)


def select_steps(names: list[str], start: str | None, stop: str | None) -> tuple[int, int]:
    for label, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise ScalelabError(f"{label} {value!r} is not a step; steps: {', '.join(names)}")
    i = names.index(start) if start else 0
    j = names.index(stop) if stop else len(names) - 1
    if i > j:
        raise ScalelabError(f"--from {start} comes after --to {stop}")
    return i, j


def run_steps(
    steps: list[Step],
    state: PipelineState,
    rerun_command: str,
    start: str | None = None,
    stop: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run steps in order; returns every step's outputs (skipped ones from the saved state)."""
    names = [s.name for s in steps]
    i, j = select_steps(names, start, stop)
    outputs: dict[str, Any] = {}
    for k, step in enumerate(steps):
        saved = state.get(step.name)
        if k < i:  # before --from: reuse what the last run produced
            if saved is None:
                raise StepFailed(
                    f"cannot start at {start!r}: step {step.name!r} has never run for this recipe; "
                    f"run `{rerun_command}` without --from first"
                )
            outputs[step.name] = saved["outputs"]
            continue
        if k > j:
            break
        fp = digest(step.fingerprint(outputs))
        forced = start is not None and k == i
        if not forced and saved and saved["fingerprint"] == fp and step.done(saved["outputs"]):
            outputs[step.name] = saved["outputs"]
            log(f"[{k + 1}/{len(steps)}] {step.name:<8} skipped (up to date)")
            continue
        log(f"[{k + 1}/{len(steps)}] {step.name:<8} running: {step.description}")
        began = time.perf_counter()
        try:
            result = step.run(outputs)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its step
            raise StepFailed(
                f"pipeline step {step.name!r} failed: {type(exc).__name__}: {exc}\n"
                f"earlier steps' outputs are kept; fix the cause and rerun from this step with:\n"
                f"  {rerun_command} --from {step.name}"
            ) from exc
        seconds = time.perf_counter() - began
        state.record(step.name, fp, result, seconds)
        outputs[step.name] = result
        log(f"[{k + 1}/{len(steps)}] {step.name:<8} done in {seconds:.1f}s")
    return outputs
