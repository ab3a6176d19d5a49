"""Build the Serve application, its Serve config file and its RayService manifest from one ServeSpec.

Three ways to run the same thing: ``scalelab serve`` (``serve.run`` on a local or remote Ray), a
Serve config file for ``serve run`` / ``serve deploy``, and a KubeRay ``RayService``. All three
are derived here from the recipe's :class:`ServeSpec`, so their settings cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import yaml

from scalelab.cluster.session import serve_ingress_env
from scalelab.config.specs import ServeSpec
from scalelab.errors import ConfigError
from scalelab.serve.settings import ReplicaConfig, replica_config

IMPORT_PATH = "scalelab.serve.deploy:app_builder"


def parse_target(target: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@alias`` or ``NAME/version`` -> (name, alias, version)."""
    if "@" in target:
        name, alias = target.split("@", 1)
        if not name or not alias:
            raise ConfigError(f"bad model reference {target!r}: use NAME, NAME@alias or NAME/version")
        return name, alias, None
    if "/" in target:
        name, version = target.split("/", 1)
        if not name or not version.isdigit():
            raise ConfigError(f"bad model reference {target!r}: use NAME, NAME@alias or NAME/version")
        return name, None, version
    return target, "champion", None


def app_name(spec: ServeSpec, model_name: str) -> str:
    return spec.app_name or f"scalelab-{model_name}"


def deployment_options(spec: ServeSpec, cfg: ReplicaConfig) -> dict[str, Any]:
    """Replicas/autoscaling, resources, queue bounds (fast 503 on overload) and the user_config."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": max(spec.max_ongoing_requests, spec.max_batch_size if spec.batching else 1),
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 20,
        "logging_config": {"enable_access_log": spec.access_log},
        "user_config": cfg.model_dump(),
    }
    if spec.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": spec.min_replicas,
            "initial_replicas": max(spec.min_replicas, 1),
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = spec.num_replicas
    return opts


def build_application(args: dict[str, Any]):
    """``args``: {model: NAME[@alias|/version], tracking_uri, bundle_path, serve: ServeSpec fields}."""
    from scalelab.serve.app import ModelServer

    spec = ServeSpec.model_validate(args.get("serve") or {})
    cfg = args.get("user_config")
    if cfg is None:
        name, alias, version = parse_target(args.get("model") or "local")
        cfg = replica_config(
            spec,
            name,
            alias,
            version,
            args.get("tracking_uri"),
            args.get("bundle_path"),
            include_key=args.get("include_key", True),
        )
    else:
        cfg = ReplicaConfig.model_validate(cfg)
    return ModelServer.options(**deployment_options(spec, cfg)).bind()


def app_builder(args: dict[str, Any]):
    """Serve config entry point (``import_path: scalelab.serve.deploy:app_builder``)."""
    return build_application(args)


def serve_config(spec: ServeSpec, target: str, tracking_uri: str | None) -> dict[str, Any]:
    """A Serve config file (``serve run`` / ``serve deploy``); the API key stays in the environment."""
    name, alias, version = parse_target(target)
    cfg = replica_config(spec, name, alias, version, tracking_uri, include_key=False)
    deployment = {"name": "ModelServer", **deployment_options(spec, cfg)}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.host, "port": spec.port},
        "applications": [
            {
                "name": app_name(spec, name),
                "route_prefix": spec.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {
                    "model": target,
                    "tracking_uri": tracking_uri,
                    "serve": spec.model_dump(mode="json"),
                    "include_key": False,
                },
                "deployments": [deployment],
            }
        ],
    }


def rayservice_manifest(spec: ServeSpec, target: str, tracking_uri: str | None) -> dict[str, Any]:
    """A KubeRay RayService running the same Serve config.

    Credentials come from Secrets (the ones ``raycluster.yaml`` uses: ``scalelab-s3``, ``scalelab-mlflow``;
    the API key from ``scalelab-serve``, key ``SCALELAB_API_KEY``, optional) — never from the manifest.
    """
    name, _, _ = parse_target(target)
    config = serve_config(spec, target, tracking_uri)
    config["http_options"]["host"] = "0.0.0.0"  # inside the pod; the Kubernetes Service decides exposure
    head, worker = _containers(spec)
    workers = spec.max_replicas if spec.autoscaling else spec.num_replicas
    serve_v2 = {"http_options": config["http_options"], "applications": config["applications"]}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": app_name(spec, name), "labels": {"app.kubernetes.io/part-of": "scalelab"}},
        "spec": {
            "serveConfigV2": _Literal(yaml.safe_dump(serve_v2, sort_keys=False)),
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "enableInTreeAutoscaling": spec.autoscaling,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "model",
                        "replicas": spec.min_replicas if spec.autoscaling else workers,
                        "minReplicas": spec.min_replicas if spec.autoscaling else workers,
                        "maxReplicas": workers,
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [worker]}},
                    }
                ],
            },
        },
    }


# The ingress settings a cluster's pods carry (serve_ingress_env minus what only matters when several
# clusters share one machine: HAProxy's stats/metrics ports and socket folder, the short drain).
PORTABLE_INGRESS_ENV = (
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",  # the header guard (serve/guard.py)
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S",
)


def ingress_env() -> dict[str, str]:
    """Serve's ingress environment for a cluster of its own (pods, VMs): HAProxy unless
    ``$SCALELAB_SERVE_INGRESS=proxy``. Set on every node (replicas serve HAProxy directly)."""
    env = serve_ingress_env()
    return {k: env[k] for k in PORTABLE_INGRESS_ENV if k in env}


def _containers(spec: ServeSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head container (no replicas: num-cpus 0 on the head) and a model-replica worker's."""
    env = [
        {
            "name": spec.api_key_env,
            "valueFrom": {
                "secretKeyRef": {"name": "scalelab-serve", "key": spec.api_key_env, "optional": True}
            },
        },
        *({"name": k, "value": v} for k, v in ingress_env().items()),
    ]
    env_from = [{"secretRef": {"name": "scalelab-s3"}}, {"secretRef": {"name": "scalelab-mlflow"}}]
    cpu = f"{spec.cpus_per_replica:g}"
    worker_resources: dict[str, Any] = {
        "requests": {"cpu": cpu, "memory": "2Gi"},
        "limits": {"cpu": cpu, "memory": "2Gi"},
    }
    if spec.gpus_per_replica:
        worker_resources["limits"]["nvidia.com/gpu"] = str(max(1, round(spec.gpus_per_replica)))
    head = {
        "name": "ray-head",
        "image": spec.image,
        "env": env,
        "envFrom": env_from,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        "ports": [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": spec.port, "name": "serve"},
        ],
    }
    worker = {
        "name": "ray-worker",
        "image": spec.image,
        "env": env,
        "envFrom": env_from,
        "resources": worker_resources,
    }
    return head, worker


class _Literal(str):
    """A string dumped as a YAML literal block (``|``), as RayService's serveConfigV2 is written by hand."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|"))


def write_yaml(data: dict[str, Any], path: str, header: str) -> None:
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_yaml(data, header))


def render_yaml(data: dict[str, Any], header: str) -> str:
    return f"# {header}\n" + yaml.dump(data, Dumper=_Dumper, sort_keys=False)
