"""The steps of `scalelab pipeline run`: data -> tune -> train -> register -> promote -> serve ->
smoke -> report. Each is a thin call into the verb's own module; this file only wires outputs
to inputs and says what makes a step stale.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from scalelab.config import dump_recipe, load_recipe, recipe_to_dict
from scalelab.config.project import absolute
from scalelab.config.specs import RecipeSpec
from scalelab.errors import ScalelabError
from scalelab.pipeline.runner import Step, digest

STEP_NAMES = ["data", "tune", "train", "register", "promote", "serve", "smoke", "report"]


def model_name(spec: RecipeSpec) -> str:
    return spec.promotion.model_name or spec.name


# ----------------------------------------------------------------------------- data
def run_data(spec: RecipeSpec, recipe: Path, overrides: list[str]) -> dict[str, Any]:
    from scalelab.data.commands import prepare
    from scalelab.data.versioning import resolve_data_version

    path = prepare(recipe, overrides, quiet=True)
    version = resolve_data_version(spec.data)
    return {"path": str(path), "version": version.to_dict(), "push": _push(recipe, overrides, path, version)}


def _push(recipe: Path, overrides: list[str], path: Path, version) -> str:
    """Push the prepared version to the DVC remote when DVC tracks it; say why not otherwise."""
    from scalelab.data.commands import push
    from scalelab.data.versioning import find_dvc_root, locked_hash

    root = find_dvc_root(path)
    if root is None or not version.path or locked_hash(root, version.path)[0] != version.content_hash:
        return "not DVC-tracked (content hash only)"
    h = version.content_hash
    if not (root / ".dvc" / "cache" / "files" / "md5" / h[:2] / h[2:]).is_file():
        # a fresh clone: dvc.lock pins the version (hash + git rev) but the cache is empty;
        # `dvc repro` rebuilds it into the cache (preparing is deterministic), pushing only
        # that stage (a bare `dvc push` would also ask for other outputs never cached here)
        stage = locking_stage(root, version.path)
        fix = (
            f"dvc repro {stage} && dvc push {stage}"
            if stage
            else f"dvc commit -f {version.path}.dvc && dvc push {version.path}.dvc"
        )
        return f"not pushed: not in the local DVC cache; `{fix}` stores it"
    try:
        return push(recipe, overrides, quiet=True) or "pushed"
    except ScalelabError as exc:  # the run can go on: the version is pinned by its hash
        return f"not pushed: {exc}"


def locking_stage(root: Path, relpath: str) -> str | None:
    """The dvc.yaml stage whose output ``relpath`` is (None: tracked by a .dvc file, or not at all)."""
    import yaml

    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    for name, stage in stages.items():
        if any(o.get("path", "").rstrip("/") == relpath for o in stage.get("outs", [])):
            return name
    return None


def data_done(out: dict[str, Any]) -> bool:
    return (Path(out["path"]) / "metadata.json").is_file()


# ----------------------------------------------------------------------------- tune
def run_tune(spec: RecipeSpec, recipe: Path, overrides: list[str]) -> dict[str, Any]:
    if not spec.search.space:
        return {"best_yaml": str(recipe), "searched": False}
    from scalelab.tune.commands import tune

    name = f"{spec.name}-pipeline-{digest(recipe_to_dict(spec))[:8]}"
    outcome = tune(recipe, overrides, name=name, quiet=True)
    if outcome.interrupted or outcome.best_yaml is None:
        raise ScalelabError(f"search {name} ended without a best trial (interrupted or all trials failed)")
    plot = outcome.search_dir / "accuracy_vs_params.png"
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
        "plot": str(plot) if plot.is_file() else None,
        "top": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in outcome.rows[:8]],
    }


# ----------------------------------------------------------------------------- train
def full_budget_recipe(spec: RecipeSpec, best_yaml: str, overrides: list[str], run_name: str) -> Path:
    """The best trial's recipe with the pipeline's budget, tracking, promotion and serving, written
    where `scalelab train` (and a user) can run it: .scalelab/pipeline/<name>/train.yaml."""
    best = load_recipe(best_yaml, overrides)
    best = best.model_copy(
        update={
            "search": spec.search.model_copy(update={"space": {}}),
            "tracking": spec.tracking,
            "promotion": spec.promotion,
            "serve": spec.serve,
            "train": best.train.model_copy(update={"run_name": run_name}),
        }
    )
    best = RecipeSpec.model_validate(recipe_to_dict(best))
    return dump_recipe(best, absolute(Path(".scalelab/pipeline") / spec.name / "train.yaml"))


def run_train(spec: RecipeSpec, outputs: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    from scalelab.train.commands import train

    # a fresh run each time the step runs (whether it runs is the fingerprint's business)
    run_name = f"{spec.name}-best-{time.strftime('%Y%m%d-%H%M%S')}"
    recipe = full_budget_recipe(spec, outputs["tune"]["best_yaml"], overrides, run_name)
    outcome = train(recipe, quiet=True)
    out_dir = outcome.model_dir.parent
    shutil.copy(recipe, out_dir / "recipe.yaml")
    m = outcome.metrics
    return {
        "run_name": outcome.run_name,
        "run_id": outcome.run_id,
        "tracking_uri": outcome.tracking_uri,
        "model_dir": str(outcome.model_dir),
        "metrics_file": str(out_dir / "metrics.json"),
        "test_acc": m.get("test_acc"),  # classifiers
        "test_map50": m.get("test_map50"),  # detectors
        "params": m["params"],
        "wall_seconds": round(m["wall_seconds"], 1),
    }


# ----------------------------------------------------------------------------- registry
def run_register(spec: RecipeSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    from scalelab.registry.commands import register

    train = outputs["train"]
    mv = register(
        train["run_id"] or train["model_dir"],
        name=model_name(spec),
        tracking_uri=spec.tracking.uri,
        description=spec.description or None,
        quiet=True,
    )
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id}


def run_promote(spec: RecipeSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    from scalelab.registry.commands import promote
    from scalelab.registry.store import champion
    from scalelab.tracking.bundles import connect
    from scalelab.tracking.uri import resolve_tracking_uri

    reg = outputs["register"]
    outcome = promote(
        reg["name"],
        version=reg["version"],
        tracking_uri=spec.tracking.uri,
        policy=spec.promotion.model_dump(),
        quiet=True,
    )
    champ = champion(connect(resolve_tracking_uri(spec.tracking.uri)), reg["name"])
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
def run_serve(
    spec: RecipeSpec, recipe: Path, overrides: list[str], outputs: dict[str, Any]
) -> dict[str, Any]:
    """Deploy NAME@champion on Ray Serve. On the embedded default a Ray head of our own (by pid,
    recorded in .scalelab/stack.json) hosts it, so the service outlives this command."""
    from scalelab.serve.commands import deploy

    ensure_lasting_ray()
    target = f"{outputs['register']['name']}@champion"
    deployment = deploy(target, overrides, recipe, tracking_uri=spec.tracking.uri)
    return {
        "url": deployment.url,
        "app": deployment.app,
        "target": target,
        "champion": outputs["promote"]["champion"],
    }


def ensure_lasting_ray() -> None:
    """Connect through the Ray session (tests, jobs, `scalelab up`); with no head to connect to,
    first start one of our own (by pid, in .scalelab/stack.json) so the served model outlives
    this command."""
    import os

    import ray

    from scalelab.cluster.session import connect_ray, live_ray_address
    from scalelab.cluster.stack import up

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and live_ray_address() is None:
        print("starting a local Ray head for the pipeline (stop it with `scalelab down`)")
        up(mlflow=False, s3=False, ray=True)
    connect_ray()  # the head's address and its token auth mode come from stack.json


def serve_done(out: dict[str, Any]) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{out['url']}/readyz", timeout=3) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not answering: deploy again
        return False


# ----------------------------------------------------------------------------- smoke
def run_smoke(spec: RecipeSpec, outputs: dict[str, Any], max_images: int = 200) -> dict[str, Any]:
    """Held-out test images over HTTP (serve/smoke.py); fails when the answers are wrong."""
    import os

    from scalelab.data.versioning import read_any
    from scalelab.serve.smoke import check_smoke, smoke_test

    test = read_any(outputs["data"]["path"]).splits["test"]
    offline = {k: v for k, v in outputs["train"].items() if k.startswith("test_") and v is not None}
    result = smoke_test(
        outputs["serve"]["url"], test, offline, os.environ.get(spec.serve.api_key_env), max_images
    )
    check_smoke(result)
    return result


# ----------------------------------------------------------------------------- report
def run_report(spec: RecipeSpec, outputs: dict[str, Any], reports_dir: str = "reports") -> dict[str, Any]:
    from scalelab.pipeline.report import write_report

    out_dir = absolute(Path(reports_dir) / spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = write_report(report_context(spec, outputs, out_dir), out_dir)
    tune, train = outputs["tune"], outputs["train"]
    logged_to = _log_report(spec, tune.get("parent_run_id") or train["run_id"], out_dir)
    return {"html": str(html_path), "markdown": str(md_path), "logged_to_run": logged_to}


def report_context(spec: RecipeSpec, outputs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """What the report shows, section by section (pipeline/report.py renders it)."""
    tune, train, promo, smoke = outputs["tune"], outputs["train"], outputs["promote"], outputs["smoke"]
    reg = outputs["register"]
    metrics = json.loads(Path(train["metrics_file"]).read_text())
    return {
        "title": f"scalelab pipeline report: {spec.name}",
        "subtitle": f"{time.strftime('%Y-%m-%d %H:%M:%S')} · recipe {spec.name} · "
        f"model {reg['name']} v{reg['version']}",
        "summary": {
            "served URL": outputs["serve"]["url"],
            **_served_quality(smoke, train),
            "parameters": train["params"],
            "promotion": promo["decision"],
            "champion version": promo["champion"],
        },
        "search": {"rows": tune.get("top", []), "plot": tune.get("plot")},
        "train": _train_section(train, metrics, out_dir),
        "promotion": {
            "decision": promo["decision"],
            "passed": promo["decision"] in ("promoted", "unchanged"),
            "numbers": {**promo["numbers"], "reasons": "; ".join(promo["reasons"])},
        },
        "serving": smoke,
        "lineage": _lineage(outputs),
    }


def _served_quality(smoke: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    if smoke.get("task") == "detection":
        return {"served AP50": smoke["served_map50"], "offline test mAP50": train["test_map50"]}
    return {"served test accuracy": smoke["served_test_acc"], "offline test accuracy": train["test_acc"]}


def _train_section(train: dict[str, Any], metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from scalelab.tracking.plots import plot_confusion_matrix, plot_training_curves

    meta = json.loads((Path(train["model_dir"]) / "model.json").read_text())
    curves = plot_training_curves(metrics.get("history", []), out_dir / "training_curves.png")
    confusion = None
    if metrics.get("confusion") is not None:
        confusion = plot_confusion_matrix(
            metrics["confusion"], meta["dataset"]["classes"], out_dir / "confusion.png"
        )
    return {
        "metrics": {
            "run": train["run_name"],
            **{k: train[k] for k in ("test_acc", "test_map50") if train.get(k) is not None},
            "params": train["params"],
            "precision": metrics.get("precision"),
            "wall_seconds": train["wall_seconds"],
            "epochs": len(metrics.get("history", [])),
        },
        "curves": curves,
        "confusion": confusion,
    }


def _lineage(outputs: dict[str, Any]) -> dict[str, Any]:
    from scalelab.tracking.lineage import git_state

    version, reg = outputs["data"]["version"], outputs["register"]
    git = git_state()
    return {
        "data": f"{version['name']} md5 {version['content_hash']}",
        "data git rev": version.get("rev"),
        "data remote": version.get("remote"),
        "git commit": git.get("git.commit"),
        "git dirty": git.get("git.dirty"),
        "search parent run": outputs["tune"].get("parent_run_id"),
        "training run": outputs["train"]["run_id"],
        "model version": f"{reg['name']} v{reg['version']}",
    }


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


def build_steps(spec: RecipeSpec, recipe: Path, overrides: list[str]) -> list[Step]:
    d = recipe_to_dict(spec)
    return [
        Step(
            "data",
            lambda o: run_data(spec, recipe, overrides),
            lambda o: d["data"],
            data_done,
            "prepare + version the dataset (DVC)",
        ),
        Step(
            "tune",
            lambda o: run_tune(spec, recipe, overrides),
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
            lambda o: run_serve(spec, recipe, overrides, o),
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
