"""The pipeline's step runner: skip up-to-date steps, --from/--to, failures named with a rerun hint."""

from pathlib import Path

import pytest

from scalelab.errors import ScalelabError
from scalelab.pipeline.runner import PipelineState, Step, StepFailed, run_steps


def make_steps(calls: list[str], params: dict, fail: str | None = None) -> list[Step]:
    def body(name):
        def run(outputs):
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return {"value": f"{name}:{params.get(name, 0)}"}

        return run

    return [
        Step("a", body("a"), lambda o: params.get("a", 0)),
        Step("b", body("b"), lambda o: [params.get("b", 0), o["a"]]),
        Step("c", body("c"), lambda o: [params.get("c", 0), o["b"]]),
    ]


def test_second_run_skips_and_changes_propagate(tmp_path: Path):
    state = PipelineState(tmp_path / "state.json")
    calls: list[str] = []
    params = {"a": 1}
    run_steps(make_steps(calls, params), state, "cmd", log=lambda m: None)
    assert calls == ["a", "b", "c"]
    calls.clear()
    run_steps(make_steps(calls, params), PipelineState(tmp_path / "state.json"), "cmd", log=lambda m: None)
    assert calls == []  # everything up to date, state read back from disk
    params["b"] = 2  # b's input changed: b reruns, and c because b's output changed
    run_steps(make_steps(calls, params), state, "cmd", log=lambda m: None)
    assert calls == ["b", "c"]


def test_from_forces_and_to_stops(tmp_path: Path):
    state = PipelineState(tmp_path / "state.json")
    calls: list[str] = []
    run_steps(make_steps(calls, {}), state, "cmd", log=lambda m: None)
    calls.clear()
    run_steps(make_steps(calls, {}), state, "cmd", start="b", stop="b", log=lambda m: None)
    assert calls == ["b"]


def test_from_needs_earlier_outputs(tmp_path: Path):
    with pytest.raises(StepFailed, match="never run"):
        run_steps(
            make_steps([], {}), PipelineState(tmp_path / "s.json"), "cmd", start="c", log=lambda m: None
        )


def test_failure_names_step_and_keeps_earlier_state(tmp_path: Path):
    state = PipelineState(tmp_path / "state.json")
    calls: list[str] = []
    with pytest.raises(StepFailed) as exc:
        run_steps(make_steps(calls, {}, fail="b"), state, "scalelab pipeline run r.yaml", log=lambda m: None)
    msg = str(exc.value)
    assert "'b' failed" in msg and "b broke" in msg and "scalelab pipeline run r.yaml --from b" in msg
    assert state.get("a") is not None and state.get("b") is None and state.get("c") is None


def test_unknown_step_names(tmp_path: Path):
    with pytest.raises(ScalelabError, match="not a step"):
        run_steps(make_steps([], {}), PipelineState(tmp_path / "s.json"), "cmd", start="zz")
