"""The per-worker loop in local mode (no Ray): accuracy, checkpoints, resume, safetensors bundles."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelab.artifacts.bundle import WEIGHTS, load_model_bundle
from scalelab.config import load_recipe
from scalelab.data import load_dataset
from scalelab.errors import CheckpointError, ConfigError
from scalelab.train.api import run_training
from scalelab.train.loop import build_model, build_optimizer, lr_factor, per_worker_batch

FAST = [
    "model.variant=msresnet_tiny",
    "train.epochs=12",
    "train.batch_size=64",
    "train.threads=2",
    "tracking.enabled=false",
]


def test_short_seeded_run_reaches_95_percent(workdir: Path):
    spec = load_recipe("pipelines/digits.yaml", FAST + ["train.run_name=acc"])
    out = run_training(spec)
    assert out.metrics["test_acc"] >= 0.95
    assert len(out.history) == 12
    conf = np.array(out.metrics["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == len(load_dataset(spec.data).splits["test"])
    # the bundle reloads (weights + spec, no pickle) and predicts like the trained model
    model, meta = load_model_bundle(out.model_dir)
    assert meta["dataset"]["classes"] == [str(i) for i in range(10)]
    assert meta["recipe"]["model"]["scales"] == 4


def test_same_seed_same_result(workdir: Path):
    a = run_training(
        load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=2", "train.run_name=a"])
    )
    b = run_training(
        load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=2", "train.run_name=b"])
    )
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-5)


def test_resume_continues_from_checkpoint(workdir: Path):
    spec = load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=2", "train.run_name=r"])
    first = run_training(spec)
    assert [h["epoch"] for h in first.history] == [1, 2]
    # the same run name with more epochs resumes at epoch 3, keeping the history
    more = load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=4", "train.run_name=r"])
    second = run_training(more)
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4]
    assert [h["resumed_from"] for h in second.history] == [0, 0, 2, 2]
    assert second.metrics["resumed_from_epoch"] == 2
    kept = sorted(p.name for p in (workdir / ".scalelab/runs/r").iterdir())
    assert len(kept) <= 3 and "checkpoint_0004" in kept  # num_to_keep best + latest


def test_tampered_weights_refused(workdir: Path):
    out = run_training(
        load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=1", "train.run_name=t"])
    )
    w = out.model_dir / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model_bundle(out.model_dir)


def test_mismatched_spec_explained(workdir: Path):
    out = run_training(
        load_recipe("pipelines/digits.yaml", [FAST[0], FAST[-1], "train.epochs=1", "train.run_name=m"])
    )
    meta_path = out.model_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["spec"]["widths"] = [32, 64, 256]  # the spec the bundle is rebuilt from
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model_bundle(out.model_dir)


def test_optimizer_steps_fused_on_cpu_and_matches_the_loop():
    """One fused kernel per step (no Python loop over parameter tensors), the same updates as
    torch's per-tensor loop, and a state dict either one loads."""
    spec = load_recipe("pipelines/digits.yaml", [FAST[0]])
    torch.manual_seed(0)
    a, b = build_model(spec.model, 1, 10, 8), build_model(spec.model, 1, 10, 8)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(spec, a)
    assert all(g["fused"] for g in fused.param_groups)
    loop = build_optimizer(spec, b)
    for g in loop.param_groups:
        g["fused"], g["foreach"] = False, False
    x = torch.randn(8, 1, 8, 8)
    for _ in range(3):
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            model(x).logsumexp(1).mean().backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    loop.load_state_dict(fused.state_dict())


def test_global_batch_rule():
    assert per_worker_batch(128, 2, 1) == 64
    assert per_worker_batch(128, 2, 2) == 32
    with pytest.raises(ValueError, match="too small"):
        per_worker_batch(2, 4, 1)


def test_schedules_are_bounded():
    for sched in ("cosine", "onecycle", "constant"):
        vals = [lr_factor(sched, s, 100, 10) for s in range(100)]
        assert max(vals) <= 1.0 + 1e-9 and min(vals) >= 0
    assert lr_factor("onecycle", 0, 100, 0) < 0.1 and lr_factor("onecycle", 30, 100, 0) == pytest.approx(
        1.0, abs=0.01
    )


def test_bf16_autocast_selected_only_when_supported():
    from scalelab.artifacts.hardware import cpu_has_fast_bf16
    from scalelab.config import TrainSpec
    from scalelab.train.runtime import select_runtime

    rt = select_runtime(TrainSpec(precision="auto"))
    assert rt.device.type == "cpu"
    assert (rt.dtype is torch.bfloat16) == cpu_has_fast_bf16()
    assert select_runtime(TrainSpec(precision="fp32")).dtype is None
    with pytest.raises(RuntimeError, match="no CUDA"):
        if not torch.cuda.is_available():
            select_runtime(TrainSpec(use_gpu=True))
        else:
            raise RuntimeError("no CUDA (skipped on GPU hosts)")


def test_test_time_flip_refused_on_digits(workdir: Path):
    spec = load_recipe("pipelines/digits.yaml", FAST + ["model.test_time_flip=true", "train.epochs=1"])
    with pytest.raises(ConfigError, match="not left-right symmetric"):
        run_training(spec)
    assert not (workdir / ".scalelab" / "runs").exists()  # refused before any run state is written


def test_tracking_that_cannot_open_still_fails_the_run(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """The MLflow run opens when epoch 1's metrics need it (off the path to the first step); a
    tracking server that cannot be reached still fails the run with the error that says what to do."""
    from scalelab.cluster.services import free_port
    from scalelab.errors import TrackingError

    monkeypatch.setenv("SCALELAB_MLFLOW_OPEN_ATTEMPTS", "1")
    overrides = [o for o in FAST if not o.startswith("tracking.")] + [
        "train.epochs=1",
        "train.run_name=untracked",
        f"tracking.uri=http://127.0.0.1:{free_port()}",  # nothing listens there
    ]
    with pytest.raises(TrackingError, match="tracking.enabled=false"):
        run_training(load_recipe("pipelines/digits.yaml", overrides))
