"""``scalelab serve NAME[@alias|/version]``: deploy the model on Ray Serve, or write its configs.

:func:`deploy` is the verb for Python callers and the pipeline (deploy, return the URL);
:func:`serve_command` is the command line's: deploy, then keep serving until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from scalelab.config.project import absolute, in_project
from scalelab.config.settings import runtime_settings
from scalelab.errors import ClusterError, ConfigError

console = Console()


@dataclass
class Deployment:
    target: str  # NAME@alias, NAME/version or NAME
    app: str  # the Serve application name
    url: str  # http://host:port/prefix (no trailing slash)
    own_cluster: bool = False  # True: a local Ray of this process's own (it ends with the process)


Target = Annotated[str, typer.Argument(help="NAME (follows @champion), NAME@alias, or NAME/version.")]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides: serve.port=8080 serve.autoscaling=true.")
]
RecipeOption = Annotated[
    Path | None, typer.Option("--recipe", help="Recipe with the serve section (default pipelines/NAME.yaml).")
]
Bundle = Annotated[
    Path | None, typer.Option("--bundle", help="Serve a local model bundle folder instead of the registry.")
]
TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: resolved).")]
Address = Annotated[
    str | None, typer.Option("--address", help="Ray address (default: the `scalelab up` stack or local).")
]


def _serve_spec(recipe: Path | None, target_name: str, overrides: list[str]):
    """The serve section of the recipe (default: pipelines/NAME.yaml of the current project)."""
    from scalelab.config.loader import apply_overrides, load_recipe, validate_recipe

    path = recipe or (
        Path(f"pipelines/{target_name}.yaml") if Path(f"pipelines/{target_name}.yaml").is_file() else None
    )
    if path:
        return load_recipe(path, overrides).serve
    # no recipe: the defaults, with the overrides (serve.port=8001) still applied
    return validate_recipe(apply_overrides({}, overrides), "command line overrides").serve


def _check_registered(name: str, alias: str | None, version: str | None, uri: str) -> None:
    """Fetch the version's bundle once here, so a missing model fails now, clearly, not in a replica."""
    import tempfile

    from scalelab.tracking.bundles import connect, fetch_version_bundle, resolve_version

    client = connect(uri)
    mv = resolve_version(client, name, version, None if version else alias)
    with tempfile.TemporaryDirectory() as tmp:
        fetch_version_bundle(client, mv, tmp)


def deploy(
    target: str,
    overrides: list[str] | None = None,
    recipe: Path | None = None,
    bundle: Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
) -> Deployment:
    """Deploy TARGET (or a local bundle) on Ray Serve and return where it answers; it keeps running.

    The application joins the Serve instance already running on the cluster (its HTTP port, its
    other models); the first one there keeps the recipe's route prefix (``/``), the others get
    ``/NAME``. Starting Serve on a port something else holds is refused. Returns once the app's
    own ``/readyz`` answers 200 (under HAProxy the port answers 404 for seconds before that).
    """
    import ray
    from ray import serve

    from scalelab.cluster.session import connect_ray, ray_address_to_use
    from scalelab.serve.deploy import app_name, build_application, parse_target
    from scalelab.tracking.uri import resolve_tracking_uri

    name, alias, version = parse_target(target)
    recipe = absolute(recipe) if recipe else None
    bundle = absolute(bundle) if bundle else None
    with in_project(recipe):
        spec = _serve_spec(recipe, name, overrides or [])
        uri = None if bundle else resolve_tracking_uri(tracking_uri)
        if uri:
            _check_registered(name, alias, version, uri)
        own_cluster = ray_address_to_use(address)[0] is None and not ray.is_initialized()
        if own_cluster:  # a new Ray has no Serve yet: its port must be free (checked before Ray starts)
            refuse_held_port(spec.host, spec.port)
        connect_ray(address, log_to_driver=False, configure_logging=False, include_dashboard=None)
    host, port = start_serve(spec.host, spec.port)
    appname = app_name(spec, name)
    prefix = choose_route_prefix(appname, name, spec.route_prefix)
    application = build_application(
        {
            "model": target,
            "tracking_uri": uri,
            "bundle_path": str(bundle) if bundle else None,
            "serve": spec.model_dump(mode="json"),
        }
    )
    serve.run(application, name=appname, route_prefix=prefix)
    url = f"http://{host}:{port}{prefix.rstrip('/')}"
    wait_ready(url, runtime_settings().serve_ready_timeout_s)
    return Deployment(target, appname, url, own_cluster)


def serve_details() -> dict | None:
    """The running Serve instance's details (http_options, applications), or None if Serve is not up."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.get_serve_details() if client is not None else None


def start_serve(host: str, port: int) -> tuple[str, int]:
    """Serve's HTTP ingress on ``host:port``, or the one the cluster already runs (whatever its port).

    A port held by anything else is refused, naming the holder: a second Serve (another cluster)
    on the same port would silently take a share of its traffic.
    """
    from ray import serve
    from ray.exceptions import RayActorError

    details = serve_details()
    if details is not None:
        http = details.get("http_options") or {}
        running = (http.get("host") or host, int(http.get("port") or port))
        if running[1] != port:
            console.print(
                f"note: Serve already runs on this cluster at {running[0]}:{running[1]}; "
                f"serving there (serve.port={port} applies only when Serve starts)",
                highlight=False,
            )
        return running
    refuse_held_port(host, port)
    # loopback: every node is on this machine, so one ingress (the head's) and no port clashes
    location = "HeadOnly" if host in ("127.0.0.1", "localhost", "::1") else "EveryNode"
    # a proxy slow to start is killed and restarted by Serve's controller: the controller runs, and
    # wait_ready() then waits for the restarted proxy
    with contextlib.suppress(RayActorError):
        serve.start(proxy_location=location, http_options={"host": host, "port": port})
    return host, port


def refuse_held_port(host: str, port: int) -> None:
    """A :class:`ClusterError` naming the holder when ``host:port`` is taken."""
    from scalelab.cluster.services import port_holder, port_in_use

    if port_in_use(host, port):
        holder = port_holder(port) or "a process this user cannot see"
        raise ClusterError(
            f"port {port} on {host} is already in use by {holder}. If that is another `scalelab serve`, "
            f"serve both models from one cluster: start the stack with `scalelab up`, then run each "
            f"`scalelab serve NAME` (the second answers under /NAME/); else stop that process or "
            f"choose another port (serve.port=8001)"
        )


RESERVED_PREFIXES = {"v1", "healthz", "readyz", "openapi.json", "docs", "favicon.ico", "-", "metrics"}


def choose_route_prefix(appname: str, model_name: str, wanted: str) -> str:
    """``wanted`` (the recipe's, ``/`` by default) unless another application holds it, then ``/NAME``.

    Redeploying an application keeps its prefix unless the recipe names another one (anything but
    the default ``/``). A model whose name is one of the app's own first path segments (``v1``,
    ``healthz``, ...) would shadow those routes of the app at ``/``.
    """
    apps = (serve_details() or {}).get("applications") or {}
    if appname in apps and apps[appname].get("route_prefix") and wanted == "/":
        return apps[appname]["route_prefix"]
    held = {a.get("route_prefix"): n for n, a in apps.items() if n != appname}
    if wanted not in held:
        return wanted
    if model_name in RESERVED_PREFIXES:
        raise ConfigError(
            f"model name {model_name!r} is also a route of the app at '/' ({held.get('/')}), so it "
            f"cannot get the prefix /{model_name}; set serve.route_prefix=/SOMETHING explicitly"
        )
    prefix = f"/{model_name}"
    if prefix in held:
        raise ConfigError(
            f"route prefix {prefix} is taken by application {held[prefix]!r}; stop it first "
            f"(`scalelab serve stop {held[prefix]}`) or set serve.route_prefix"
        )
    return prefix


def wait_ready(url: str, timeout: float) -> None:
    """Until ``url/readyz`` answers 200: the app's own route, not the port (under HAProxy the port
    answers 404 until the new route is in its config)."""
    import urllib.error
    import urllib.request

    settings = runtime_settings()
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=settings.http_probe_timeout_s) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(settings.startup_poll_s)
    raise ClusterError(f"{url}/readyz did not answer 200 within {timeout:.0f}s (last: {last})")


def _emit(target: str, spec, uri: str | None, emit_config: Path | None, emit_rayservice: Path | None) -> None:
    from scalelab.serve.deploy import ingress_env, rayservice_manifest, serve_config, write_yaml

    if emit_config:
        env = " ".join(f"{k}={v}" for k, v in ingress_env().items())
        header = (
            f"Generated by `scalelab serve {target} --emit-config`; run with `serve run` or `serve deploy`.\n"
            f"# Start every node of the cluster with {env}\n"
            "# (the ingress and header guard `scalelab up` uses)."
        )
        write_yaml(serve_config(spec, target, uri), emit_config, header)
        console.print(f"wrote {emit_config}")
    if emit_rayservice:
        header = f"Generated by `scalelab serve {target} --emit-rayservice`; `kubectl apply -f` it."
        write_yaml(rayservice_manifest(spec, target, uri), emit_rayservice, header)
        console.print(f"wrote {emit_rayservice}")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _stop_own_ray(orderly_s: float = 4.0) -> None:
    """Stop the local Ray this command started and exit: ``ray.shutdown``, bounded (what still runs
    after ``orderly_s``: raylet, GCS, workers, HAProxy, is terminated together, then killed), then
    the process ends at once (exit-time handlers of the libraries took seconds and have nothing
    left to do)."""
    import os
    import sys
    import threading

    import ray

    from scalelab.cluster.services import descendants, terminate_processes

    tree = descendants(os.getpid())  # now: once the raylet is gone, its workers belong to init
    orderly = threading.Thread(target=ray.shutdown, daemon=True)
    orderly.start()
    orderly.join(orderly_s)
    terminate_processes(tree + descendants(os.getpid()), grace_s=2.0)
    console.print("stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _serve_until_stopped(deployment: Deployment) -> None:
    """Block until Ctrl-C or SIGTERM, then stop what this command started, in seconds.

    A local Ray of our own goes down whole (``ray.shutdown``: controller, HAProxy, replicas; ~2 s);
    an application deployed into a running cluster is deleted without waiting for its replicas
    to drain (the cluster and its other applications keep running).
    """
    from ray import serve

    signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installed a handler of its own
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if deployment.own_cluster:
            _stop_own_ray()
        else:
            serve.delete(deployment.app, _blocking=False)


def serve_command(
    target: Target,
    overrides: Overrides = None,
    recipe: RecipeOption = None,
    bundle: Bundle = None,
    tracking_uri: TrackingUri = None,
    address: Address = None,
    emit_config: Annotated[
        Path | None, typer.Option("--emit-config", help="Write the Serve config file here and exit.")
    ] = None,
    emit_rayservice: Annotated[
        Path | None, typer.Option("--emit-rayservice", help="Write a RayService manifest and exit.")
    ] = None,
) -> None:
    """Serve a registered model over HTTP with Ray Serve (batching, autoscaling, hot swap)."""
    if emit_config or emit_rayservice:
        from scalelab.serve.deploy import parse_target

        with in_project(absolute(recipe) if recipe else None):
            spec = _serve_spec(absolute(recipe) if recipe else None, parse_target(target)[0], overrides or [])
        # tracking_uri None: replicas take MLFLOW_TRACKING_URI from their environment
        _emit(target, spec, tracking_uri, emit_config, emit_rayservice)
        return
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it as cleanly as Ctrl-C, even mid-deploy
    deployment = deploy(target, overrides, recipe, bundle, tracking_uri, address)
    url = deployment.url
    console.print(
        f"[bold green]serving[/] {target} at {url}/ (demo page), {url}/v1/predict; Ctrl-C stops it",
        highlight=False,
    )
    _serve_until_stopped(deployment)


def _connect_existing(address: str | None) -> None:
    """Connect to the running stack (or ``--address``); never start a new Ray just to look."""
    import ray

    from scalelab.cluster.session import connect_ray, ray_address_to_use

    if ray.is_initialized():  # this process's own Ray (Python callers, tests)
        return
    if ray_address_to_use(address)[0] is None:
        raise ClusterError(
            "no running Ray cluster to look at: start one with `scalelab up` (then `scalelab serve NAME` "
            "deploys into it), pass --address HOST:PORT, or set RAY_ADDRESS. A `scalelab serve` run "
            "without a stack serves from a Ray of its own, which Ctrl-C in its terminal stops"
        )
    connect_ray(address, log_to_driver=False, configure_logging=False)


def list_served(address: Address = None) -> None:
    """List the models served on the running cluster: application, status, URL."""
    from rich.table import Table

    _connect_existing(address)
    details = serve_details()
    apps = (details or {}).get("applications") or {}
    if not apps:
        console.print("no models are served on this cluster")
        return
    http = details.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    rows = []
    for name, app in sorted(apps.items()):
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        status = app.get("status")
        rows.append((name, str(getattr(status, "value", status)), f"{base}{prefix}/", served_model(app)))
    table = Table("application", "status")
    table.add_column("url", no_wrap=True, min_width=max(len(r[2]) for r in rows))  # copyable, never cut
    table.add_column("model", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def served_model(app: dict) -> str:
    """What an application serves: NAME@alias, NAME/version or the bundle folder, from its replicas'
    user_config (``serve.run`` deployments have no deployed_app_config to read it from)."""
    args_model = ((app.get("deployed_app_config") or {}).get("args") or {}).get("model")
    for deployment in (app.get("deployments") or {}).values():
        cfg = (deployment.get("deployment_config") or {}).get("user_config") or {}
        if cfg.get("bundle_path"):
            return f"bundle {cfg['bundle_path']}"
        if cfg.get("model_name"):
            pinned = f"/{cfg['version']}" if cfg.get("version") else f"@{cfg.get('alias')}"
            return f"{cfg['model_name']}{pinned}"
    return args_model or ""


def stop_served(
    name: Annotated[str, typer.Argument(help="Model NAME or Serve application name (see `serve list`).")],
    address: Address = None,
) -> None:
    """Stop one served model on the running cluster; the others keep serving."""
    from ray import serve

    _connect_existing(address)
    apps = (serve_details() or {}).get("applications") or {}
    appname = name if name in apps else f"scalelab-{name}"
    if appname not in apps:
        served = ", ".join(sorted(apps)) or "none"
        raise ConfigError(f"no application {name!r} is served on this cluster; served: {served}")
    serve.delete(appname, _blocking=False)
    deadline = time.time() + runtime_settings().serve_stop_timeout_s
    while time.time() < deadline and appname in ((serve_details() or {}).get("applications") or {}):
        time.sleep(0.3)
    console.print(f"stopped {appname}")
