"""Job specs: every file in jobs/ validates (with its recipe); KubeRay manifests agree with them."""

from pathlib import Path

import pytest
import yaml

from scalelab.cluster.jobs import check_resources, entrypoint, load_job_spec, recipe_overrides, validate_job
from scalelab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_spec_validates(path: Path):
    spec = load_job_spec(path)
    recipe = validate_job(spec, REPO)
    if spec.verb in ("train", "tune", "pipeline"):
        assert recipe is not None
    cmd = entrypoint(spec, "/opt/py/bin/python")
    assert cmd.startswith("/opt/py/bin/python -m scalelab.cli " + spec.verb)


def test_required_job_specs_exist():
    names = {p.stem for p in JOBS}
    assert {"train", "tune", "pipeline", "serve"} <= names


def test_cluster_settings_become_overrides():
    spec = load_job_spec(REPO / "jobs/train.yaml")
    over = recipe_overrides(spec)
    assert "train.workers=2" in over and "train.placement_strategy=SPREAD" in over
    recipe = validate_job(spec, REPO)
    assert recipe.train.workers == 2 and recipe.train.placement_strategy == "SPREAD"


def test_unknown_verb_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nverb: trian\nrecipe: pipelines/digits.yaml\n")
    with pytest.raises(ConfigError, match="verb"):
        load_job_spec(bad)


def test_missing_recipe_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nverb: train\nrecipe: pipelines/nope.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        validate_job(load_job_spec(bad), REPO)


def test_impossible_resources_are_refused():
    spec = load_job_spec(REPO / "jobs/train.yaml", ["train.workers=8"])
    recipe = validate_job(spec, REPO)
    with pytest.raises(ConfigError, match="CPUs"):
        check_resources(spec, recipe, {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    gpu = load_job_spec(REPO / "jobs/train-gpu.yaml")
    with pytest.raises(ConfigError, match="GPU"):
        check_resources(gpu, validate_job(gpu, REPO), {"CPU": 64.0}, [{"CPU": 64.0}])


def _manifests():
    out = {}
    for path in (REPO / "platform/kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion", "").startswith("ray.io/"):
                out[doc["kind"]] = doc
    return out


def test_kuberay_manifests_use_ray_io_v1_fields():
    docs = _manifests()
    assert {"RayCluster", "RayJob"} <= set(docs)
    for kind, doc in docs.items():
        assert doc["apiVersion"] == "ray.io/v1", kind
    cluster = docs["RayCluster"]["spec"]
    assert set(cluster) >= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    job = docs["RayJob"]["spec"]
    assert set(job) >= {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"}
    for spec in (cluster, job["rayClusterSpec"]):
        assert spec["rayVersion"] == __import__("ray").__version__
        for group in spec["workerGroupSpecs"]:
            res = group["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
            assert "tolerations" in group["template"]["spec"] and "nodeSelector" in group["template"]["spec"]


def test_rayjob_entrypoint_matches_job_spec():
    job = _manifests()["RayJob"]["spec"]
    spec = load_job_spec(REPO / "jobs/train-gpu.yaml")
    assert job["entrypoint"] == entrypoint(spec, "python", isolate=False)
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == spec.cluster.workers
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == spec.cluster.gpus_per_worker


def test_no_secrets_in_manifests():
    for path in (REPO / "platform/kuberay").glob("*.yaml"):
        if "example" in path.name:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("kind") != "Secret" and "stringData" not in str(doc), path.name


def test_a_job_can_stream_its_data_from_the_remote():
    spec = load_job_spec(REPO / "jobs/train-stream.yaml")
    recipe = validate_job(spec, REPO)
    assert recipe.data.format == "stream" and recipe.data.stream_from == "remote"
    assert recipe.train.workers == 2 and recipe.train.checkpoint_every_steps == 50
    assert recipe.train.memory_per_worker_mb == 2000
