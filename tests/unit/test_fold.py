"""BatchNorm folding for inference (models/fold.py) and the Predictor that uses it."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from toy_bundle import save_toy_bundle

from scalelab.models import create_model, list_models
from scalelab.models.blocks import MultiScaleBottleneck
from scalelab.models.fold import fold_batchnorm, fold_conv_bn, folded_copy


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms (fresh ones are the identity map: folding them would
    prove nothing), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(x, with_aux=True)
    flat = []
    for o in out if isinstance(out, tuple) else (out,):
        flat.extend(o if isinstance(o, list) else [o])
    return flat


CASES = [(name, {}) for name in list_models(task="classification")] + [
    ("msresnet_s", {"pyramid_stem": True, "split_dilation": True, "head": "weighted"}),
    ("msresnet_tiny", {"scales": 1}),
    ("msresnet_s", {"stem": "large"}),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=lambda c: str(c))
def test_folded_classifier_gives_the_same_outputs_with_no_batchnorm_left(name, overrides):
    size = 64 if overrides.get("stem") == "large" else 28
    model = trained_looking(create_model(name, in_chans=1, num_classes=10, image_size=size, **overrides))
    folded = copy.deepcopy(model)
    before = batchnorms(model)
    assert fold_batchnorm(folded) == before > 0
    assert batchnorms(folded) == 0
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    for a, b in zip(outputs(model, x), outputs(folded, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models(task="detection"))
def test_folded_detector_gives_the_same_heatmaps_and_boxes(name):
    model = trained_looking(create_model(name, in_chans=1, num_classes=10, image_size=64))
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == batchnorms(model) > 0 and batchnorms(folded) == 0
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for a, b in zip(model(x), folded(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_depthwise_split_folds_into_its_pointwise_conv():
    block = trained_looking(MultiScaleBottleneck(16, 16, 16, scales=4, depthwise=True))
    pairs = block.conv_bn_pairs()
    pointwise = [conv for conv, owner, _ in pairs if owner is block.bns]
    assert pointwise == [split[1] for split in block.convs]  # not the depthwise 3x3 before it
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        want = block(x)
        fold_batchnorm(block)
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)


def test_folded_copy_leaves_the_trained_model_as_it_was():
    model = trained_looking(create_model("msresnet_tiny", in_chans=1, num_classes=10, image_size=8)).train()
    before = batchnorms(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    copy_ = folded_copy(model)
    assert batchnorms(copy_) == 0 and not copy_.training
    assert model.training and batchnorms(model) == before > 0
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(outputs(copy_, x), outputs(model.eval(), x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "conv,bn",
    [
        (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=True), nn.BatchNorm2d(8, affine=False)),
        (nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True), nn.BatchNorm2d(12)),
        (nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6, eps=1e-3)),
    ],
    ids=["depthwise-dilated-bias-no-affine", "grouped-bias", "pointwise-eps"],
)
def test_fold_conv_bn_math_for_bias_affine_groups_and_eps(conv, bn):
    seq = trained_looking(nn.Sequential(conv, bn))
    if conv.bias is not None:
        conv.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 7, 7)
    want = seq(x)
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], nn.Identity)
    torch.testing.assert_close(seq(x), want, rtol=1e-4, atol=1e-5)


def test_a_sequential_subclass_with_its_own_forward_is_not_folded():
    class Residual(nn.Sequential):  # conv and BN on two paths: y = bn(x) + conv(x)
        def forward(self, x):
            return self[1](x) + self[0](x)

    model = trained_looking(Residual(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 4, 5, 5)
    want = model(x)
    assert fold_batchnorm(model) == 0
    torch.testing.assert_close(model(x), want)


def test_a_model_in_training_mode_is_refused_and_left_as_it_was():
    model = create_model("msresnet_tiny", in_chans=1, num_classes=10, image_size=8)
    before = batchnorms(model)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())
    model.eval()
    model.stages[0].train()  # a part left in training mode still updates its batch statistics
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    assert batchnorms(model) == before > 0


def test_batchnorm_without_running_statistics_is_left_alone():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, track_running_stats=False))
    assert fold_batchnorm(seq.eval()) == 0 and isinstance(seq[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(seq[0], seq[1])


def test_a_batchnorm_not_right_after_a_conv_is_not_folded():
    seq = trained_looking(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    want = seq(x)
    assert fold_batchnorm(seq) == 0
    torch.testing.assert_close(seq(x), want)


def test_predictor_folds_its_own_model_and_predicts_what_the_unfolded_one_does(tmp_path):
    from scalelab.artifacts.predictor import Predictor

    model = trained_looking(create_model("msresnet_tiny", in_chans=1, num_classes=3, image_size=8))
    bundle = save_toy_bundle(model, tmp_path / "model")
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    folded = Predictor.from_bundle(bundle)
    plain = Predictor(*_reload(bundle), fold_bn=False)
    assert folded.folded_bn == batchnorms(plain.model) > 0 and batchnorms(folded.model) == 0
    np.testing.assert_allclose(folded.predict_proba(images), plain.predict_proba(images), atol=1e-5)
    # the bundle on disk keeps its BatchNorm layers and statistics
    assert batchnorms(_reload(bundle)[0]) == batchnorms(model)


def _reload(bundle):
    from scalelab.artifacts.bundle import load_model_bundle

    return load_model_bundle(bundle, verify_checksum=True)
