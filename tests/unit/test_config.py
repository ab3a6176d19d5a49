import pytest

from scalelab.config import load_recipe, parse_override, validate_recipe
from scalelab.errors import ConfigError


def test_dotted_overrides_apply_and_parse_types():
    spec = load_recipe("pipelines/digits.yaml", ["train.epochs=3", "model.scales=2", "model.depths=[1,1,1]"])
    assert spec.train.epochs == 3
    assert spec.model.scales == 2
    assert spec.model.depths == [1, 1, 1]
    assert spec.model.variant == "msresnet_s"  # the variant's other fields still apply
    assert spec.model.widths == [64, 128, 256]


def test_variant_fields_are_overridable():
    spec = validate_recipe({"model": {"variant": "resnet_s", "se": True}})
    assert spec.model.scales == 1 and spec.model.se


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train.epochs=[1,"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_recipe("pipelines/digits.yaml", ["train.epochz=3"])
    msg = str(exc.value)
    assert "pipelines/digits.yaml" in msg and "train.epochz" in msg and "epochs" in msg


def test_wrong_type_names_value():
    with pytest.raises(ConfigError) as exc:
        load_recipe("pipelines/digits.yaml", ["train.lr=fast"])
    assert "train.lr" in str(exc.value) and "'fast'" in str(exc.value)


def test_yaml_syntax_error_has_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(bad)
    assert "line" in str(exc.value) and str(bad) in str(exc.value)


def test_missing_file_lists_recipes():
    with pytest.raises(ConfigError) as exc:
        load_recipe("pipelines/nope.yaml")
    assert "digits.yaml" in str(exc.value)


def test_unknown_variant_is_clear():
    with pytest.raises(ConfigError) as exc:
        validate_recipe({"model": {"variant": "nope"}})
    assert "unknown model variant 'nope'" in str(exc.value)


@pytest.mark.parametrize(
    "model, fragment",
    [
        ({"scales": 0}, "scales"),
        ({"widths": [30, 60, 120], "scales": 4, "bottleneck_ratio": 1.0}, "not divisible by scales=4"),
        ({"depths": [1, 1], "widths": [8, 8, 8]}, "one entry per stage"),
    ],
)
def test_invalid_model_shapes(model, fragment):
    with pytest.raises(ConfigError) as exc:
        validate_recipe({"model": model})
    assert fragment in str(exc.value)
