"""Register the model of a training run (or of a search's best run) as a new registered version."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from scalelab.artifacts.bundle import MODEL_META, load_model_bundle, read_bundle_meta
from scalelab.errors import RegistryError, ScalelabError
from scalelab.registry.gate import data_status
from scalelab.tracking.bundles import BUNDLE_DIR, classify_store_error, download_run_bundle, store_error

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
METRICS = ("test_acc", "test_loss", "val_acc", "params")


def resolve_run(client, ref: str):
    """A run id, or a run/search name: the search's final full-budget run, else its best trial."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise RegistryError(f"no MLflow run with id {ref}") from None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        raise RegistryError(f"no MLflow experiments at {client.tracking_uri}: nothing named {ref!r}")

    def search(flt: str):
        return list(
            client.search_runs(experiments, flt, order_by=["attributes.start_time DESC"], max_results=50)
        )

    quoted = ref.replace("'", "\\'")
    searches = search(f"tags.`scalelab.kind` = 'search' AND tags.`scalelab.search` = '{quoted}'")
    named = search(f"tags.`mlflow.runName` = '{quoted}'")
    parent = (searches or named or [None])[0]
    candidates = []
    if searches:
        pid = searches[0].info.run_id
        # the search's full-budget training run, then the best trial (when it kept a bundle)
        candidates += search(f"tags.`scalelab.search` = '{quoted}' AND tags.`scalelab.role` = 'final'")
        best_id = searches[0].data.tags.get("scalelab.best_run_id")
        if best_id:
            candidates.append(client.get_run(best_id))
        candidates += search(f"tags.`mlflow.parentRunId` = '{pid}' AND tags.`scalelab.best_trial` = 'true'")
    candidates += named
    for run in candidates:
        if _has_bundle(client, run):
            return run
    if parent is None:
        raise RegistryError(
            f"{ref!r} is neither a run id (32 hex digits) nor the name of an MLflow run or search"
        )
    raise RegistryError(
        f"{ref!r} ({parent.info.run_id}) has no model bundle, and no final or best-trial run with one "
        f"was found; train the best config (`scalelab train <best.yaml>`) and register that run's id"
    )


def _has_bundle(client, run) -> bool:
    """Whether the run logged a model bundle; a store that cannot be read is an error, not a no."""
    run_id = run.info.run_id
    try:
        return any(a.path.endswith(MODEL_META) for a in client.list_artifacts(run_id, BUNDLE_DIR))
    except Exception as exc:  # noqa: BLE001 - classified: only a missing bundle means "no"
        if classify_store_error(exc) == "missing":
            return False
        where = run.info.artifact_uri or client.tracking_uri
        raise store_error(exc, f"cannot list the model bundle of run {run_id}", where) from None


def _logged_model(client, run) -> Any | None:
    """The run's MLflow model named 'model' (MLflow 3 LoggedModel), when the run logged one."""
    try:
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
    except Exception:  # noqa: BLE001 - older servers: register the bundle itself
        return None
    return next((m for m in models if m.name == "model"), None)


def version_tags(run, meta: dict[str, Any], test_sha256: str | None) -> dict[str, str]:
    from scalelab.config.loader import spec_hash
    from scalelab.config.specs import RecipeSpec

    rt = dict(run.data.tags)
    tags = {
        "weights_sha256": meta["weights_sha256"],
        "run_id": run.info.run_id,
        "git.commit": rt.get("git.commit") or rt.get("mlflow.source.git.commit") or "unknown",
        "recipe": meta["recipe"].get("name", ""),
        "model.variant": str(meta["recipe"].get("model", {}).get("variant")),
        "precision": str(meta.get("precision")),
    }
    try:
        tags["scalelab.spec_hash"] = rt.get("scalelab.spec_hash") or spec_hash(
            RecipeSpec.model_validate(meta["recipe"])
        )
    except Exception:  # noqa: BLE001 - a recipe from another scalelab version
        tags["scalelab.spec_hash"] = rt.get("scalelab.spec_hash", "unknown")
    dv = meta.get("data_version") or {}
    tags["data.name"] = dv.get("name") or meta["dataset"].get("name", "")
    tags["data.status"] = data_status(meta)
    for key in ("content_hash", "rev", "remote", "path"):
        if dv.get(key):
            tags[f"data.{'hash' if key == 'content_hash' else key}"] = str(dv[key])
    for key, value in rt.items():
        if key.startswith("data.") and value:
            tags.setdefault(key, value)
    if test_sha256:
        tags["data.test_sha256"] = test_sha256
    metrics = run.data.metrics
    for key in METRICS:
        if key in metrics:
            tags[f"metric.{key}"] = f"{metrics[key]:.6g}"
    return tags


def log_bundle_run(
    client,
    bundle_dir: str | Path,
    experiment: str = "scalelab",
    run_name: str | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Log a local model bundle folder as an MLflow run with ``bundle/`` artifacts; returns the run id.

    For bundles trained with tracking disabled (``outputs/<run>/model``), so they can be registered.
    """
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(
        exp_id,
        run_name=run_name or bundle_dir.parent.name,
        tags={"scalelab.source": "bundle", "scalelab.bundle_path": str(bundle_dir.resolve())},
    )
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, float(value))
    for key, value in (meta.get("data_version") or {}).items():
        if value:
            client.set_tag(run.info.run_id, f"data.{'hash' if key == 'content_hash' else key}", str(value))
    client.log_artifacts(run.info.run_id, str(bundle_dir), BUNDLE_DIR)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def register_run(
    client, ref: str, name: str | None = None, alias: str | None = None, description: str | None = None
):
    """Create a new version of NAME from a run's bundle; returns the ModelVersion."""
    from mlflow.exceptions import MlflowException

    from scalelab.registry.gate import load_test_split

    if Path(ref).is_dir() and (Path(ref) / "model.json").is_file():
        metrics_file = Path(ref).parent / "metrics.json"
        metrics = {}
        if metrics_file.is_file():
            import json

            metrics = {
                k: v
                for k, v in json.loads(metrics_file.read_text()).items()
                if k in METRICS and isinstance(v, (int, float))
            }
        ref = log_bundle_run(client, ref, metrics=metrics)
    run = resolve_run(client, ref)
    with tempfile.TemporaryDirectory(prefix="scalelab-register-") as tmp:
        bundle = download_run_bundle(client, run.info.run_id, Path(tmp))
        load_model_bundle(bundle, verify_checksum=True)  # weights match model.json and the spec
        meta = read_bundle_meta(bundle)
    recipe = meta.get("recipe") or {}
    name = name or (recipe.get("promotion") or {}).get("model_name") or recipe.get("name")
    if not name:
        raise RegistryError("the run's recipe has no name; pass --name")
    try:
        _, _, test_sha = load_test_split(meta)
    except ScalelabError:
        test_sha = None  # data not available here: the gate checks shapes and statistics instead
    tags = version_tags(run, meta, test_sha)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                tags={"scalelab.recipe": recipe.get("name", "")},
                description=recipe.get("description") or f"scalelab model {name}",
            )
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                raise
    logged = _logged_model(client, run)
    source = logged.model_uri if logged is not None else f"{run.info.artifact_uri}/{BUNDLE_DIR}"
    mv = client.create_model_version(
        name,
        source,
        run_id=run.info.run_id,
        tags=tags,
        description=description or recipe.get("description") or None,
        model_id=logged.model_id if logged is not None else None,
    )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return client.get_model_version(name, mv.version)
