"""The artifacts layer: bundles that outlive variant changes, old bundles, one evaluation, store errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from toy_bundle import save_toy_bundle

from scalelab.artifacts.bundle import MODEL_META, load_model_bundle
from scalelab.artifacts.evaluate import Images, evaluate_predictor
from scalelab.artifacts.predictor import Predictor
from scalelab.config import variants
from scalelab.config.specs import ModelSpec, RecipeSpec
from scalelab.errors import CheckpointError, TrackingError
from scalelab.models import create_model
from scalelab.tracking.bundles import classify_store_error

SHAPE = {"in_chans": 1, "num_classes": 3, "image_size": 8}


def _bundle(tmp_path: Path, variant: str = "msresnet_tiny", **overrides) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model(variant, **SHAPE, **overrides).eval()
    return save_toy_bundle(model, tmp_path / "bundle", variant, **overrides), model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-2, 2, 2 * 8 * 8).view(2, 1, 8, 8)
    with torch.no_grad():
        return model.eval()(x)


def test_bundle_records_the_resolved_spec(tmp_path: Path):
    path, _ = _bundle(tmp_path, scales=2)
    record = json.loads((path / MODEL_META).read_text())["model"]
    assert record["spec"]["variant"] is None and record["variant"] == "msresnet_tiny"
    assert set(record["spec"]) == set(ModelSpec.model_fields)  # every field, not just the recipe's
    assert record["spec"]["scales"] == 2
    assert (record["in_chans"], record["num_classes"], record["image_size"]) == (1, 3, 8)


@pytest.mark.parametrize("change", ["unregister", "redefine"])
def test_bundle_loads_after_its_variant_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str):
    path, model = _bundle(tmp_path)
    expected = _outputs(model)
    if change == "unregister":
        monkeypatch.delitem(variants._VARIANTS, "msresnet_tiny")
        with pytest.raises(ValueError, match="unknown model variant"):
            create_model("msresnet_tiny", **SHAPE)
    else:  # same name, another architecture: the bundle must not pick it up
        monkeypatch.setitem(
            variants._VARIANTS, "msresnet_tiny", lambda: dict(depths=[2, 2], widths=[16, 32], scales=2)
        )
    loaded, meta = load_model_bundle(path)
    assert loaded.spec.depths == model.spec.depths and loaded.spec.widths == model.spec.widths
    assert torch.equal(_outputs(loaded), expected)


def _as_old_bundle(path: Path) -> None:
    """What bundles looked like before the resolved spec was recorded (the recipe only)."""
    meta = json.loads((path / MODEL_META).read_text())
    del meta["model"], meta["bundle_format"]
    (path / MODEL_META).write_text(json.dumps(meta))


def test_old_bundles_load_from_their_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path, model = _bundle(tmp_path, scales=2)
    _as_old_bundle(path)
    loaded, _ = load_model_bundle(path)
    assert torch.equal(_outputs(loaded), _outputs(model))
    # an old bundle needs its variant: without it, a clear error rather than a wrong model
    monkeypatch.delitem(variants._VARIANTS, "msresnet_tiny")
    with pytest.raises(CheckpointError, match="predates resolved specs.*msresnet_tiny"):
        load_model_bundle(path)


def test_evaluation_uses_the_bundles_statistics(tmp_path: Path):
    """tune's best-trial check and the gate score with the bundle's mean/std, not the dataset's."""
    from scalelab.tune.driver import evaluate_checkpoint

    path, _ = _bundle(tmp_path)
    rng = np.random.default_rng(0)
    split = Images(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 40))
    predictor = Predictor.from_bundle(path)
    result = evaluate_predictor(predictor, split, keep_probabilities=True)
    # the same probabilities as the serving path's predict_proba, and accuracy from them
    assert np.allclose(result.probabilities, predictor.predict_proba(split.x), atol=1e-6)
    assert result.accuracy == pytest.approx(float((result.probabilities.argmax(1) == split.y).mean()))
    assert result.confusion.sum() == 40
    # a dataset whose (re-prepared) statistics differ must not change the number
    data = SimpleNamespace(splits={"test": split}, mean=[0.0], std=[1.0], num_classes=3)
    spec = RecipeSpec.model_validate({"name": "t", "train": {"precision": "fp32"}})
    assert evaluate_checkpoint(str(path), data, spec) == pytest.approx(result.accuracy)


# ----------------------------------------------------------------------------- store errors


def _mlflow_error(code: int, message: str = "failed"):
    from mlflow.exceptions import MlflowException

    return MlflowException(message, error_code=code)


def _http_error(status: int):
    import requests

    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


def _s3_error(code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "ListObjectsV2")


def _store_errors():
    import requests
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    from mlflow.protos import databricks_pb2 as codes

    refused = (
        "API request to http://127.0.0.1:5999/api/2.0/mlflow-artifacts/artifacts failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: ... "
        "(Caused by NewConnectionError('Failed to establish a new connection: "
        "[Errno 111] Connection refused'))"
    )
    return [
        ("auth", _mlflow_error(codes.UNAUTHENTICATED)),
        ("auth", _mlflow_error(codes.PERMISSION_DENIED)),
        ("auth", _http_error(401)),
        ("auth", _http_error(403)),
        ("auth", _s3_error("AccessDenied")),
        ("auth", _s3_error("InvalidAccessKeyId")),
        ("auth", NoCredentialsError()),
        ("network", _mlflow_error(codes.INTERNAL_ERROR, refused)),
        ("network", requests.ConnectionError("boom")),
        ("network", ConnectionRefusedError(111, "Connection refused")),
        ("network", EndpointConnectionError(endpoint_url="http://127.0.0.1:9")),
        ("network", requests.Timeout("read timed out")),
        ("missing", _mlflow_error(codes.RESOURCE_DOES_NOT_EXIST)),
        ("missing", _http_error(404)),
        ("missing", _s3_error("NoSuchKey")),
        ("other", ValueError("something else")),
    ]


@pytest.mark.parametrize(
    "kind,exc", _store_errors(), ids=lambda v: v if isinstance(v, str) else type(v).__name__
)
def test_store_errors_are_classified(kind: str, exc: Exception):
    assert classify_store_error(exc) == kind


def test_store_error_class_follows_the_cause():
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("listing failed") from inner
    except RuntimeError as outer:
        assert classify_store_error(outer) == "network"


class _Client:
    tracking_uri = "http://127.0.0.1:5999"

    def __init__(self, outcome):
        self.outcome = outcome

    def list_artifacts(self, run_id, path):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _run(artifact_uri: str = "s3://bucket/1/abc/artifacts"):
    return SimpleNamespace(info=SimpleNamespace(run_id="a" * 32, artifact_uri=artifact_uri))


def test_register_says_what_went_wrong_instead_of_no_bundle():
    from mlflow.protos import databricks_pb2 as codes

    from scalelab.registry.register import _has_bundle

    assert _has_bundle(_Client([SimpleNamespace(path="bundle/model.json")]), _run()) is True
    assert _has_bundle(_Client([]), _run()) is False
    assert _has_bundle(_Client(_s3_error("NoSuchKey")), _run()) is False
    with pytest.raises(TrackingError, match=r"s3://bucket/1/abc/artifacts refused the credentials"):
        _has_bundle(_Client(_mlflow_error(codes.PERMISSION_DENIED)), _run())
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:5999 is unreachable"):
        _has_bundle(_Client(ConnectionRefusedError(111, "Connection refused")), _run(artifact_uri=""))
    with pytest.raises(TrackingError, match="failed at .*ValueError"):
        _has_bundle(_Client(ValueError("odd")), _run())
