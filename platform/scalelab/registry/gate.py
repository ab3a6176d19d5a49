"""The promotion gate: candidate vs champion on the champion's held-out data, latency, smoke test.

Both models are evaluated through the serving path (:class:`scalelab.artifacts.predictor.Predictor`,
scored by ``artifacts.evaluate``, the evaluation training and `scalelab evaluate` use), so the
accuracy, latency and smoke predictions the gate judges are what users will get.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scalelab.artifacts.evaluate import Images, evaluate_predictor
from scalelab.artifacts.predictor import Predictor
from scalelab.artifacts.preprocess import decode_image_bytes
from scalelab.config.specs import DataSpec, PromotionSpec
from scalelab.errors import RegistryError, ScalelabError


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    numbers: dict[str, Any] = field(default_factory=dict)


def test_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return h.hexdigest()


def describe_data(meta: dict[str, Any]) -> str:
    dv = meta.get("data_version") or {}
    name = dv.get("name") or meta["dataset"].get("name")
    parts = [f"{name}"]
    if dv.get("content_hash"):
        parts.append(f"hash {dv['content_hash'][:12]}")
    if dv.get("rev"):
        parts.append(f"rev {dv['rev'][:10]}")
    return " ".join(parts)


def load_test_split(meta: dict[str, Any], expected_fingerprint: str | None = None):
    """The test split of the data version a bundle was trained on: (x uint8 NHWC, y, fingerprint).

    The data is read from the recipe's prepared copy (prepared from the raw source when absent:
    preparation is seeded and deterministic) and must match what the bundle recorded — classes,
    shape, normalisation statistics, split sizes, and the test-set fingerprint taken at
    registration — or the comparison would be on other data, which is refused.
    """
    from scalelab.data.catalog import load_dataset

    label = describe_data(meta)
    try:
        spec = DataSpec.model_validate(meta["recipe"]["data"])
        ds = load_dataset(spec)
    except ScalelabError as exc:
        raise RegistryError(
            f"the held-out data {label} cannot be read: {exc}. Restore that data version "
            f"(`dvc checkout`/`dvc pull` at rev {(meta.get('data_version') or {}).get('rev') or '?'}) "
            f"and retry"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a recipe this version of scalelab cannot read
        raise RegistryError(f"the held-out data {label} cannot be read: {exc}") from None
    want, got = meta["dataset"], ds.metadata()
    diffs = [
        f"{k}: recorded {want.get(k)!r}, found {got.get(k)!r}"
        for k in ("classes", "image_size", "channels", "split_sizes")
        if k in want and want.get(k) != got.get(k)
    ]
    for k in ("mean", "std"):
        if k in want and not np.allclose(want[k], got[k], atol=1e-5):
            diffs.append(f"{k}: recorded {want[k]}, found {got[k]}")
    test = ds.splits["test"]
    fingerprint = test_fingerprint(test.x, test.y)
    if expected_fingerprint and fingerprint != expected_fingerprint:
        diffs.append(f"test split sha256 {fingerprint[:12]}... != registered {expected_fingerprint[:12]}...")
    if diffs:
        raise RegistryError(
            f"the local copy of {label} ({spec.data_dir}/{spec.name}) is not the data version the model was "
            f"trained on: {'; '.join(diffs)}. Check out that version (`dvc checkout`) and retry"
        )
    return test.x, test.y, fingerprint


def accuracy(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, batch: int = 256
) -> tuple[float, np.ndarray]:
    """Accuracy and the probabilities (N, K) behind it, in the precision the model was trained in."""
    result = evaluate_predictor(predictor, Images(x, y), batch_size=batch, keep_probabilities=True)
    return result.accuracy, result.probabilities


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def serve_one(predictor: Predictor, raw: bytes) -> int:
    """The whole single-image serving path: PNG bytes -> decode -> preprocess -> model -> class."""
    arr = decode_image_bytes(raw, predictor.input, max_pixels=1 << 24)
    return int(predictor.predict_proba(arr[None]).argmax(1)[0])


def latency_p95_ms(predictor: Predictor, raws: list[bytes], samples: int = 40, warmup: int = 5) -> float:
    """p95 of the single-image serving path, on one torch thread (a default replica's CPU budget)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(warmup + samples):
            t0 = time.perf_counter()
            serve_one(predictor, raws[i % len(raws)])
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return float(np.percentile(times, 95))


def smoke_indices(y: np.ndarray, reference_probs: np.ndarray, count: int) -> list[int]:
    """Known images: the ones the reference model gets right most confidently, cycling through classes."""
    confidence = reference_probs[np.arange(len(y)), y]
    right = np.flatnonzero(reference_probs.argmax(1) == y)
    right = right[np.argsort(-confidence[right], kind="stable")]
    by_class = {int(c): list(right[y[right] == c]) for c in np.unique(y)}
    chosen: list[int] = []
    while len(chosen) < count and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(chosen) < count:
                chosen.append(int(by_class[c].pop(0)))
    return chosen


def data_status(meta: dict[str, Any]) -> str:
    """``versioned`` / ``unversioned`` as the bundle says (older bundles: from the git revision)."""
    recorded = meta.get("data_status")
    return recorded or ("versioned" if (meta.get("data_version") or {}).get("rev") else "unversioned")


def unversioned_data_refusal(meta: dict[str, Any], policy: PromotionSpec) -> str | None:
    """Why a model trained on unversioned data may not become champion (None: it may)."""
    if data_status(meta) == "versioned" or policy.allow_unversioned_data:
        return None
    return (
        f"trained on unversioned data ({describe_data(meta)}: no DVC file + git commit records it, so "
        f"nobody can fetch it again to check or retrain). Version it (`dvc add`, `git commit`) and "
        f"retrain, or allow it with promotion.allow_unversioned_data=true"
    )


def evaluate_gate(
    candidate: Predictor,
    champion: Predictor | None,
    policy: PromotionSpec,
    expected_fingerprint: str | None = None,
) -> GateResult:
    """Judge a candidate. With a champion, both run on the champion's test split."""
    unversioned = unversioned_data_refusal(candidate.meta, policy)
    if unversioned:
        return GateResult(False, [unversioned], {"data": describe_data(candidate.meta)})
    reference = champion or candidate
    if champion is not None and (
        candidate.input.classes != champion.input.classes
        or candidate.input.channels != champion.input.channels
    ):
        return GateResult(
            False,
            [
                f"candidate classes/channels {list(candidate.classes)}/{candidate.input.channels} "
                f"differ from "
                f"the champion's {list(champion.classes)}/{champion.input.channels}: not comparable"
            ],
        )
    x, y, fingerprint = load_test_split(reference.meta, expected_fingerprint)
    cand_acc, cand_probs = accuracy(candidate, x, y)
    numbers: dict[str, Any] = {
        "data": describe_data(reference.meta),
        "test_sha256": fingerprint,
        "test_images": len(y),
        "candidate_acc": round(cand_acc, 6),
        "min_accuracy": policy.min_accuracy,
    }
    reasons: list[str] = []
    passed = True
    if cand_acc < policy.min_accuracy:
        passed = False
        reasons.append(f"accuracy {cand_acc:.4f} is below the floor min_accuracy={policy.min_accuracy}")
    ref_probs = cand_probs
    if champion is not None:
        champ_acc, ref_probs = accuracy(champion, x, y)
        delta = cand_acc - champ_acc
        numbers.update(champion_acc=round(champ_acc, 6), delta=round(delta, 6), min_delta=policy.min_delta)
        if delta < policy.min_delta - 1e-12:
            passed = False
            reasons.append(
                f"accuracy {cand_acc:.4f} vs champion {champ_acc:.4f}: gain {delta:+.4f} "
                f"< min_delta {policy.min_delta}"
            )
    idx = smoke_indices(y, ref_probs, policy.smoke_images)
    raws = [png_bytes(x[i]) for i in idx] or [png_bytes(x[0])]
    smoke_ok = sum(serve_one(candidate, r) == int(y[i]) for r, i in zip(raws, idx, strict=False))
    numbers.update(smoke_correct=smoke_ok, smoke_total=len(idx))
    if smoke_ok < len(idx):
        passed = False
        reasons.append(
            f"smoke test: {smoke_ok}/{len(idx)} known images predicted correctly through the serving path"
        )
    p95 = latency_p95_ms(candidate, raws)
    numbers.update(latency_p95_ms=round(p95, 3), latency_budget_ms=policy.latency_p95_ms)
    if p95 > policy.latency_p95_ms:
        passed = False
        reasons.append(
            f"p95 single-image latency {p95:.2f} ms exceeds the budget of {policy.latency_p95_ms} ms"
        )
    if passed:
        reasons.append("all checks passed")
    return GateResult(passed, reasons, numbers)
