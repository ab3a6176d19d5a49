"""Ray Train V2's fixed scaling policy for a cluster that no autoscaler can grow.

Ray Train V2's ``FixedScalingPolicy`` registers every run's resources with Ray's
``AutoscalingCoordinator``: a detached actor (a Python process of its own) that it creates on the
cluster's first run and asks synchronously before the worker group starts. Its one use is telling
an autoscaler what to add. On a cluster without one (a local Ray, `scalelab up`, a fixed set of
machines) it only costs: ~1.1 s on the first run's path to its first step, and, for the cluster's
lifetime, one more Python process whose main thread wakes every 10 ms (every Ray Python worker
does), taking turns with training threads on a small machine.

Imported only where a trainer is built (it imports Ray Train); the controller actor unpickles the
policy by reference, so this module must exist where the controller runs: it does, with scalelab.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


class FixedClusterScalingPolicy(FixedScalingPolicy):
    """``FixedScalingPolicy``'s decisions, without the AutoscalingCoordinator."""

    def after_controller_start(self, train_run_context: Any) -> None:
        return None  # no resource request: nothing could act on it

    def _maybe_send_resource_request(self) -> None:
        return None  # what Ray's decisions call; its _send_resource_request is then never reached


def without_autoscaling_coordinator(policy: Any) -> Any:
    """``policy`` as :class:`FixedClusterScalingPolicy` when it is Ray's plain fixed policy; any
    other (elastic training resizes with the autoscaler's help) is returned as it is."""
    if type(policy) is FixedScalingPolicy:
        return FixedClusterScalingPolicy(policy.scaling_config)
    return policy


def cluster_can_autoscale() -> bool:
    """Whether an autoscaler has published its cluster config to this Ray cluster (KubeRay with
    autoscaling, `ray up`); a local Ray and `scalelab up` have none. Unknown counts as yes."""
    try:
        from ray._private.state import state

        return state.get_cluster_config() is not None
    except Exception:  # another Ray version: keep Ray's default behaviour
        return True
