import pytest
import torch

from scalelab.config import ModelSpec
from scalelab.models import count_flops, count_params, create_model, list_models, variant_config
from scalelab.models.blocks import MultiScaleBottleneck

CLASSIFIERS = list_models(task="classification")


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("size,chans", [(8, 1), (28, 1), (32, 3)])
def test_forward_backward_shapes(name, size, chans):
    torch.manual_seed(0)
    model = create_model(name, in_chans=chans, num_classes=7, image_size=size)
    x = torch.randn(2, chans, size, size)
    logits, aux = model(x, with_aux=True)
    assert logits.shape == (2, 7)
    assert all(a.shape == (2, 7) for a in aux)
    assert torch.isfinite(logits).all()
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    feats = model.forward_features(x)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
    for f, info in zip(feats, model.feature_info, strict=True):  # each stride-2 step rounds up
        assert f.shape[-1] == max(1, -(-size // info["reduction"])) or size < info["reduction"] * 2


def test_scales_one_is_plain_bottleneck():
    # A plain ResNet bottleneck: 1x1 (in->inner), 3x3 (inner->inner), 1x1 (inner->out), 3 BNs.
    cin, inner, cout = 32, 16, 64
    block = MultiScaleBottleneck(cin, cout, inner, stride=1, scales=1)
    plain = cin * inner + inner * inner * 9 + inner * cout + 2 * (inner + inner + cout)
    shortcut = cin * cout + 2 * cout
    assert count_params(block) == plain + shortcut
    assert len(block.convs) == 1


def test_multiscale_splits_are_chained():
    block = MultiScaleBottleneck(16, 16, 16, scales=4)
    assert len(block.convs) == 3 and block.width == 4


@pytest.mark.parametrize(
    "multi,plain", [("msresnet_tiny", "resnet_tiny"), ("msresnet_s", "resnet_s"), ("msresnet_m", "resnet_m")]
)
def test_baselines_match_parameters(multi, plain):
    assert variant_config(plain)["scales"] == 1
    a, b = count_params(create_model(multi)), count_params(create_model(plain))
    assert abs(a - b) / a < 0.03


def test_create_model_overrides_and_flops():
    m2 = create_model("msresnet_tiny", scales=2)
    m4 = create_model("msresnet_tiny")
    assert m2.spec.scales == 2 and m4.spec.scales == 4
    assert count_flops(m4, 1, 8) > 0
    assert count_params(create_model("msresnet_tiny", se=True)) > count_params(m4)
    assert count_params(create_model("msresnet_tiny", depthwise=True)) < count_params(m4)


@pytest.mark.parametrize("head", ["last", "mean_logits", "concat"])
def test_head_fusions(head):
    model = create_model("msresnet_tiny", head=head, head_stages=[0, 1, 2])
    logits, aux = model(torch.randn(3, 1, 8, 8), with_aux=True)
    assert logits.shape == (3, 10)
    assert len(aux) == (2 if head == "last" else 3)


def test_invalid_block_args_raise():
    with pytest.raises(ValueError, match="scales"):
        MultiScaleBottleneck(8, 8, 8, scales=0)
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleBottleneck(8, 8, 10, scales=4)
    with pytest.raises(ValueError):
        ModelSpec(scales=3, widths=[64, 128, 256], bottleneck_ratio=0.5)


def test_test_time_flip_averages_mirror_in_eval_only():
    torch.manual_seed(0)
    plain = create_model("msresnet_tiny")
    tta = create_model("msresnet_tiny", test_time_flip=True)
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 8, 8)
    plain.eval(), tta.eval()
    with torch.no_grad():
        expected = (plain(x) + plain(x.flip(-1))) / 2
        got = tta(x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, plain(x), atol=1e-3)  # it does change the answer
        # a mirrored input gives the same prediction: the averaged model is flip-invariant
        assert torch.allclose(tta(x.flip(-1)), got, atol=1e-5)
    plain.train(), tta.train()
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    assert torch.allclose(tta(x), a)  # training forward is untouched


def test_test_time_flip_refused_for_detection():
    with pytest.raises(ValueError, match="classifiers"):
        ModelSpec(variant="msdet_s", test_time_flip=True)


def test_test_time_flip_survives_torch_export_with_dynamic_batch():
    # mlflow.pytorch.log_model (pt2) exports the eval-mode model with a dynamic batch dimension
    model = create_model("msresnet_tiny", test_time_flip=True).eval()
    example = torch.randn(2, 1, 8, 8)
    prog = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(prog.module()(x), model(x), atol=1e-5)


def test_split_dilation_grows_along_the_chain_at_equal_cost():
    plain = create_model("msresnet_tiny")
    dilated = create_model("msresnet_tiny", split_dilation=True)
    block = dilated.stages[2][0]
    assert [c.dilation for c in block.convs] == [(1, 1), (2, 2), (3, 3)]
    assert [c.padding for c in block.convs] == [(1, 1), (2, 2), (3, 3)]
    assert count_params(dilated) == count_params(plain)
    assert count_flops(dilated, 1, 28) == count_flops(plain, 1, 28)  # same multiply-adds, wider view
    listed = create_model("msresnet_tiny", split_dilation=[1, 3], kernel_sizes=[3, 5])
    assert [c.dilation[0] for c in listed.stages[0][0].convs] == [1, 3, 1]
    one = create_model("msresnet_tiny", scales=1, split_dilation=True, widths=[32, 64, 128])
    assert one.stages[0][0].convs[0].dilation == (1, 1)  # a single split is never dilated
    x = torch.randn(2, 1, 28, 28)
    logits, aux = dilated(x, with_aux=True)
    assert logits.shape == (2, 10)
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    assert all(p.grad is not None for p in dilated.parameters())
    with pytest.raises(ValueError, match="split_dilation"):
        ModelSpec(variant="msresnet_tiny", split_dilation=[0])


def test_weighted_head_learns_softmax_fusion_with_aux_losses():
    from scalelab.models import classification_loss

    torch.manual_seed(0)
    model = create_model("msresnet_tiny", head="weighted", head_stages=[0, 1, 2])
    mean = create_model("msresnet_tiny", head="mean_logits", head_stages=[0, 1, 2])
    assert count_params(model) == count_params(mean) + 3  # one fusion weight per head stage
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, aux = model(x, with_aux=True)
    assert len(aux) == 3
    assert torch.allclose(logits, torch.stack(aux).mean(0), atol=1e-6)  # zero weights: the mean
    with torch.no_grad():
        model.head.fusion_logits.copy_(torch.tensor([0.0, 0.0, 20.0]))
    logits, aux = model(x, with_aux=True)
    assert torch.allclose(logits, aux[2], atol=1e-4)  # a dominant weight selects its stage
    classification_loss((logits, aux), y, aux_weight=0.3).backward()
    assert model.head.fusion_logits.grad is not None and model.head.side[0].weight.grad.abs().sum() > 0


def test_pyramid_stem_adds_a_half_size_branch():
    plain = create_model("msresnet_tiny", image_size=28)
    pyr = create_model("msresnet_tiny", image_size=28, pyramid_stem=True)
    width = pyr.spec.stem_width
    assert count_params(pyr) == count_params(plain) + 9 * width + 2 * width  # 3x3 conv + BN
    assert count_flops(pyr, 1, 28) > count_flops(plain, 1, 28)
    for size, stem in [(28, "small"), (27, "small"), (64, "large")]:
        model = create_model("msresnet_tiny", image_size=size, stem=stem, pyramid_stem=True)
        x = torch.randn(2, 1, size, size, requires_grad=True)
        logits = model(x)
        assert logits.shape == (2, 10)
        logits.sum().backward()
        assert model.stem.coarse[0].weight.grad.abs().sum() > 0


def test_new_architecture_keys_survive_a_bundle_round_trip(tmp_path):
    from scalelab.artifacts.bundle import load_model_bundle, save_model_bundle

    torch.manual_seed(0)
    model = create_model(
        "msresnet_tiny", image_size=28, split_dilation=True, head="weighted", pyramid_stem=True
    ).eval()
    with torch.no_grad():
        model.head.fusion_logits.copy_(torch.tensor([0.3, -0.2]))
    meta = {"channels": 1, "num_classes": 10, "image_size": 28}
    loaded, _ = load_model_bundle(save_model_bundle(model, tmp_path / "bundle", meta))
    spec = loaded.spec
    assert (spec.split_dilation, spec.head, spec.pyramid_stem) == (True, "weighted", True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x), atol=1e-5)


def test_new_keys_default_to_the_old_model():
    spec = ModelSpec(variant="msresnet_tiny")
    assert (spec.split_dilation, spec.pyramid_stem, spec.head) == (False, False, "mean_logits")
    old = {k: v for k, v in spec.model_dump().items() if k not in ("split_dilation", "pyramid_stem")}
    assert ModelSpec.model_validate(old) == spec  # a bundle written before these keys loads as before
