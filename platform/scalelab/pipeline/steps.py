"""The steps of `scalelab pipeline run`: data -> tune -> train -> register -> promote -> serve ->
smoke -> report. Each is a thin call into the verb's own module; this file only wires outputs
to inputs and says what makes a step stale.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.config import dump_recipe, load_recipe, recipe_to_dict
from scalelab.config.specs import RecipeSpec
from scalelab.errors import ScalelabError
from scalelab.pipeline.runner import Step, digest

STEP_NAMES = ["data", "tune", "train", "register", "promote", "serve", "smoke", "report"]


def model_name(spec: RecipeSpec) -> str:
    return spec.promotion.model_name or spec.name


# ----------------------------------------------------------------------------- data
def run_data(spec: RecipeSpec) -> dict[str, Any]:
    from scalelab.data.catalog import prepare
    from scalelab.data.versioning import find_dvc_root, locked_hash, resolve_data_version

    path = prepare(spec.data)
    version = resolve_data_version(spec.data)
    pushed = "not DVC-tracked (content hash only)"
    root = find_dvc_root(path)
    if root is not None and version.path and locked_hash(root, version.path)[0] == version.content_hash:
        h = version.content_hash
        if not (root / ".dvc" / "cache" / "files" / "md5" / h[:2] / h[2:]).is_file():
            # a fresh clone: dvc.lock pins the version (hash + git rev) but the cache is empty
            pushed = "not pushed: not in the local DVC cache; `dvc repro prepare && dvc push` stores it"
        else:
            from scalelab.data.remote import transfer

            try:
                pushed = transfer(root, "push", [version.path]) or "pushed"
            except ScalelabError as exc:  # the run can go on: the version is pinned by its hash
                pushed = f"not pushed: {exc}"
    return {"path": str(path), "version": version.to_dict(), "push": pushed}


def data_done(out: dict[str, Any]) -> bool:
    return (Path(out["path"]) / "metadata.json").is_file()


# ----------------------------------------------------------------------------- tune
def run_tune(spec: RecipeSpec, recipe_path: Path) -> dict[str, Any]:
    if not spec.search.space:
        return {"best_yaml": str(recipe_path), "searched": False}
    from scalelab.tune.driver import run_search

    name = f"{spec.name}-pipeline-{digest(recipe_to_dict(spec))[:8]}"
    outcome = run_search(spec, name=name)
    if outcome.interrupted or outcome.best_yaml is None:
        raise ScalelabError(f"search {name} ended without a best trial (interrupted or all trials failed)")
    plot = outcome.search_dir / "accuracy_vs_params.png"
    plot = plot if plot.is_file() else None
    return {
        "searched": True,
        "name": name,
        "best_yaml": str(outcome.best_yaml),
        "search_dir": str(outcome.search_dir),
        "parent_run_id": outcome.parent_run_id,
        "trials": len(outcome.rows),
        "pruned": len(outcome.pruned),
        "best_test_acc": outcome.test_acc,
        "wall_seconds": round(outcome.wall_seconds, 1),
        "plot": str(plot) if plot else None,
        "top": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in outcome.rows[:8]],
    }


# ----------------------------------------------------------------------------- train
def run_train(spec: RecipeSpec, outputs: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    from scalelab.train.api import run_training

    best = load_recipe(outputs["tune"]["best_yaml"], overrides)
    # the full-budget run keeps the pipeline recipe's training budget and tracking settings
    best = best.model_copy(
        update={
            "search": spec.search.model_copy(update={"space": {}}),
            "tracking": spec.tracking,
            "promotion": spec.promotion,
            "serve": spec.serve,
        }
    )
    best = RecipeSpec.model_validate(recipe_to_dict(best))
    # a fresh run each time the step runs (whether it runs is the fingerprint's business)
    run_name = f"{spec.name}-best-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = run_training(best, run_name=run_name)
    out_dir = outcome.model_dir.parent
    dump_recipe(best, out_dir / "recipe.yaml")
    return {
        "run_name": outcome.run_name,
        "run_id": outcome.run_id,
        "model_dir": str(outcome.model_dir),
        "metrics_file": str(out_dir / "metrics.json"),
        "test_acc": outcome.metrics["test_acc"],
        "params": outcome.metrics["params"],
        "wall_seconds": round(outcome.metrics["wall_seconds"], 1),
    }


# ----------------------------------------------------------------------------- registry
def run_register(spec: RecipeSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    from scalelab.registry.register import register_run
    from scalelab.registry.store import connect
    from scalelab.tracking.uri import resolve_tracking_uri

    train = outputs["train"]
    client = connect(resolve_tracking_uri(spec.tracking.uri))
    ref = train["run_id"] or train["model_dir"]
    mv = register_run(client, ref, name=model_name(spec), description=spec.description or None)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id}


def run_promote(spec: RecipeSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    from scalelab.registry.promote import promote
    from scalelab.registry.store import champion, connect
    from scalelab.tracking.uri import resolve_tracking_uri

    reg = outputs["register"]
    client = connect(resolve_tracking_uri(spec.tracking.uri))
    outcome = promote(client, reg["name"], version=reg["version"], policy=spec.promotion.model_dump())
    champ = champion(client, reg["name"])
    if champ is None:
        raise ScalelabError(
            f"no @champion for {reg['name']}: version {reg['version']} was refused "
            f"({'; '.join(outcome.reasons)}), so there is nothing to serve"
        )
    return {
        "decision": outcome.decision,
        "reasons": outcome.reasons,
        "numbers": _plain(outcome.numbers),
        "candidate": outcome.candidate,
        "previous": outcome.previous,
        "champion": str(champ.version),
    }


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- serve
def run_serve(spec: RecipeSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """Deploy NAME@champion on Ray Serve. On the embedded default a Ray head of our own (by pid,
    recorded in .scalelab/stack.json) hosts it, so the service outlives this command."""
    import ray
    from ray import serve

    from scalelab.serve.deploy import app_name, build_application
    from scalelab.tracking.uri import resolve_tracking_uri

    name = outputs["register"]["name"]
    target = f"{name}@champion"
    if not ray.is_initialized():
        from scalelab.pipeline.commands import ensure_lasting_ray

        ensure_lasting_ray()
    s = spec.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    uri = resolve_tracking_uri(spec.tracking.uri)
    application = build_application(
        {"model": target, "tracking_uri": uri, "serve": s.model_dump(mode="json")}
    )
    appname = app_name(s, name)
    serve.run(application, name=appname, route_prefix=s.route_prefix)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    return {"url": url, "app": appname, "target": target, "champion": outputs["promote"]["champion"]}


def serve_done(out: dict[str, Any]) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{out['url']}/readyz", timeout=3) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not answering: deploy again
        return False


# ----------------------------------------------------------------------------- smoke
def run_smoke(spec: RecipeSpec, outputs: dict[str, Any], max_images: int = 200) -> dict[str, Any]:
    """POST held-out test images (PNG) over HTTP; accuracy and latency as a client sees them."""
    import base64
    import os

    import httpx
    from PIL import Image

    from scalelab.data.dataset import read_prepared

    data = read_prepared(outputs["data"]["path"])
    test = data.splits["test"]
    n = min(max_images, len(test))
    url = outputs["serve"]["url"]
    headers = {}
    key = os.environ.get(spec.serve.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"

    def png(img: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    latencies, correct, errors = [], 0, 0
    with httpx.Client(timeout=30, headers=headers) as client:
        model_info = client.get(f"{url}/v1/model").json()
        for i in range(n):
            t = time.perf_counter()
            r = client.post(f"{url}/v1/predict", json={"images": [png(test.x[i])]})
            latencies.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                errors += 1
                continue
            top = r.json()["predictions"][0][0]  # image 0, best class
            correct += int(top["index"] == int(test.y[i]))
    lat = sorted(latencies)
    return {
        "url": url,
        "images": n,
        "errors": errors,
        "served_test_acc": round(correct / max(1, n), 4),
        "offline_test_acc": round(outputs["train"]["test_acc"], 4),
        "latency_p50_ms": round(statistics.median(lat), 2),
        "latency_p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
        "served_version": str(model_info.get("version")),
    }


# ----------------------------------------------------------------------------- report
def run_report(spec: RecipeSpec, outputs: dict[str, Any], reports_dir: str = "reports") -> dict[str, Any]:
    from scalelab.pipeline.report import write_report
    from scalelab.tracking.plots import plot_confusion_matrix, plot_training_curves

    out_dir = Path(reports_dir) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    train = outputs["train"]
    metrics = json.loads(Path(train["metrics_file"]).read_text())
    meta = json.loads((Path(train["model_dir"]) / "model.json").read_text())
    curves = plot_training_curves(metrics.get("history", []), out_dir / "training_curves.png")
    confusion = None
    if metrics.get("confusion") is not None:
        confusion = plot_confusion_matrix(
            metrics["confusion"], meta["dataset"]["classes"], out_dir / "confusion.png"
        )
    tune, promo, smoke = outputs["tune"], outputs["promote"], outputs["smoke"]
    version = outputs["data"]["version"]
    from scalelab.tracking.lineage import git_state

    git = git_state()
    ctx = {
        "title": f"scalelab pipeline report: {spec.name}",
        "subtitle": f"{time.strftime('%Y-%m-%d %H:%M:%S')} · recipe {spec.name} · "
        f"model {outputs['register']['name']} v{outputs['register']['version']}",
        "summary": {
            "served URL": outputs["serve"]["url"],
            "served test accuracy": smoke["served_test_acc"],
            "offline test accuracy": train["test_acc"],
            "parameters": train["params"],
            "promotion": promo["decision"],
            "champion version": promo["champion"],
        },
        "search": {"rows": tune.get("top", []), "plot": tune.get("plot")},
        "train": {
            "metrics": {
                "run": train["run_name"],
                "test_acc": train["test_acc"],
                "params": train["params"],
                "precision": metrics.get("precision"),
                "wall_seconds": train["wall_seconds"],
                "epochs": len(metrics.get("history", [])),
            },
            "curves": curves,
            "confusion": confusion,
        },
        "promotion": {
            "decision": promo["decision"],
            "passed": promo["decision"] in ("promoted", "unchanged"),
            "numbers": {**promo["numbers"], "reasons": "; ".join(promo["reasons"])},
        },
        "serving": smoke,
        "lineage": {
            "data": f"{version['name']} md5 {version['content_hash']}",
            "data git rev": version.get("rev"),
            "data remote": version.get("remote"),
            "git commit": git.get("git.commit"),
            "git dirty": git.get("git.dirty"),
            "search parent run": tune.get("parent_run_id"),
            "training run": train["run_id"],
            "model version": f"{outputs['register']['name']} v{outputs['register']['version']}",
        },
    }
    html_path, md_path = write_report(ctx, out_dir)
    logged_to = _log_report(spec, tune.get("parent_run_id") or train["run_id"], out_dir)
    return {"html": str(html_path), "markdown": str(md_path), "logged_to_run": logged_to}


def _log_report(spec: RecipeSpec, run_id: str | None, out_dir: Path) -> str | None:
    if not run_id or not spec.tracking.enabled:
        return None
    import mlflow

    from scalelab.tracking.uri import resolve_tracking_uri

    try:
        mlflow.MlflowClient(resolve_tracking_uri(spec.tracking.uri)).log_artifacts(
            run_id, str(out_dir), "report"
        )
    except Exception as exc:  # noqa: BLE001 - the report is on disk either way
        print(f"warning: report not logged to MLflow run {run_id}: {exc}")
        return None
    return run_id


def build_steps(spec: RecipeSpec, recipe_path: Path, overrides: list[str]) -> list[Step]:
    d = recipe_to_dict(spec)
    return [
        Step(
            "data",
            lambda o: run_data(spec),
            lambda o: d["data"],
            data_done,
            "prepare + version the dataset (DVC)",
        ),
        Step(
            "tune",
            lambda o: run_tune(spec, recipe_path),
            lambda o: [d["search"], d["model"], d["train"], o["data"]["version"]["content_hash"]],
            lambda out: Path(out["best_yaml"]).is_file(),
            "Ray Tune search (Optuna + ASHA)",
        ),
        Step(
            "train",
            lambda o: run_train(spec, o, overrides),
            lambda o: [
                o["tune"]["best_yaml"],
                Path(o["tune"]["best_yaml"]).read_text(),
                d["train"],
                d["tracking"],
            ],
            lambda out: (Path(out["model_dir"]) / "model.safetensors").is_file(),
            "train the best spec at full budget",
        ),
        Step(
            "register",
            lambda o: run_register(spec, o),
            lambda o: [o["train"]["run_id"], model_name(spec)],
            description="register the model version in MLflow",
        ),
        Step(
            "promote",
            lambda o: run_promote(spec, o),
            lambda o: [o["register"], d["promotion"]],
            description="gate against @champion; move the alias if it passes",
        ),
        Step(
            "serve",
            lambda o: run_serve(spec, o),
            lambda o: [o["promote"]["champion"], d["serve"]],
            serve_done,
            "Ray Serve deployment of NAME@champion",
        ),
        Step(
            "smoke",
            lambda o: run_smoke(spec, o),
            lambda o: [o["serve"], o["data"]["version"]],
            description="held-out test images over HTTP",
        ),
        Step(
            "report",
            lambda o: run_report(spec, o),
            lambda o: [o[k] for k in ("tune", "train", "register", "promote", "smoke")],
            lambda out: Path(out["html"]).is_file(),
            "HTML + Markdown report, logged to MLflow",
        ),
    ]
