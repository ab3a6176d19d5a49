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
