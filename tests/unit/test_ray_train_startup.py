"""Start-up of `scalelab train` on Ray Train (issue 19): Ray Train V2's default callbacks that only
start processes here (a DatasetManager without datasets, a placement-group cleaner for a one-run
driver on one node) are left out; every other callback is kept, in order."""

from __future__ import annotations

import pytest

from scalelab.train.ray_trainer import lean_train_callbacks


def _callback(name: str):
    return type(name, (), {})()


DEFAULTS = [
    "AcceleratorSetupCallback",
    "BackendSetupCallback",
    "PlacementGroupCleanerCallback",
    "DatasetsCallback",
    "WorkingDirectorySetupCallback",
    "UserCallbackHandler",
]


def names(callbacks: list) -> list[str]:
    return [type(cb).__name__ for cb in callbacks]


def test_no_datasets_drops_the_dataset_manager_and_keeps_the_rest_in_order():
    kept = lean_train_callbacks(
        [_callback(n) for n in DEFAULTS], has_datasets=False, drop_placement_group_cleaner=False
    )
    assert names(kept) == [n for n in DEFAULTS if n != "DatasetsCallback"]


def test_datasets_keep_their_callback_and_a_one_run_driver_drops_the_cleaner():
    defaults = [_callback(n) for n in DEFAULTS]
    kept = lean_train_callbacks(defaults, has_datasets=True, drop_placement_group_cleaner=True)
    assert names(kept) == [n for n in DEFAULTS if n != "PlacementGroupCleanerCallback"]
    both = lean_train_callbacks(defaults, has_datasets=False, drop_placement_group_cleaner=True)
    assert "DatasetsCallback" not in names(both) and "PlacementGroupCleanerCallback" not in names(both)
    assert len(both) == len(DEFAULTS) - 2


def test_a_local_ray_for_training_starts_no_idle_workers_a_head_is_left_as_it_is(monkeypatch, tmp_path):
    import ray

    from scalelab.cluster import session

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    no_stack = tmp_path / "stack.json"
    assert session.connect_ray(prestart_workers=False, stack_file=no_stack)
    assert session.connect_ray(stack_file=no_stack)
    no_prestart = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    assert calls[0]["_system_config"] == no_prestart
    assert calls[1]["_system_config"] is None  # other commands' local Ray: Ray's defaults
    monkeypatch.setattr(session, "_check_reachable", lambda address, source: None)
    session.connect_ray("127.0.0.1:6379", prestart_workers=False, stack_file=no_stack)
    assert "_system_config" not in calls[2]  # a running head's settings are its own


def test_on_a_fixed_cluster_the_scaling_policy_decides_as_rays_without_the_coordinator():
    """Ray's fixed policy creates the AutoscalingCoordinator actor when the controller starts and asks
    it before every decision; the fixed-cluster one makes the same decisions without it."""
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2.api.config import ScalingConfig

    from scalelab.train.ray_policy import FixedClusterScalingPolicy, without_autoscaling_coordinator

    plain = FixedScalingPolicy(ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}))
    lean = without_autoscaling_coordinator(plain)
    assert type(lean) is FixedClusterScalingPolicy and lean.scaling_config is plain.scaling_config
    lean.after_controller_start(SimpleNamespace(run_id="r1"))  # Ray's: a detached actor, then a call
    decision = lean.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision)
    assert decision.num_workers == 2 and decision.resources_per_worker == {"CPU": 1}
    assert isinstance(lean.make_decision_for_running_worker_group(None, None), NoopDecision)
    with pytest.raises(AssertionError):  # Ray's own, never started, needs the coordinator to decide
        plain.make_decision_for_non_running_worker_group()
    elastic = SimpleNamespace(scaling_config=plain.scaling_config)  # any other policy: left as it is
    assert without_autoscaling_coordinator(elastic) is elastic
