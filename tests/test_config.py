"""RunConfig: every choice declared once, every setting checked once, one override syntax."""

import dataclasses

import pytest

from pneumoscan.core import config
from pneumoscan.core.config import ConfigError, RunConfig, apply_overrides, parse_overrides
from pneumoscan.core.errors import UserError


def test_declared_choices_match_the_library():
    """config.py declares the choices without importing torch; the modules that act on them agree."""
    from pneumoscan.cli import common
    from pneumoscan.io import data
    from pneumoscan.evaluation import explain
    from pneumoscan.modeling import backbones, heads, transforms
    from pneumoscan.inference import loading

    assert config.AUGMENTATIONS == transforms.AUGMENTATIONS
    assert config.CLASS_WEIGHT_MODES == data.CLASS_WEIGHT_MODES
    assert config.BACKBONES == tuple(backbones.BACKBONES)
    assert config.HEAD_NAMES == tuple(heads.HEADS)
    assert config.WEIGHTS_NORMALIZATIONS == ("auto", *backbones.NORMALIZATIONS)
    assert common.ENGINES == loading.KINDS and common.CAM_METHODS == tuple(explain.METHODS)


def test_defaults_and_recipes_are_valid():
    from pneumoscan.core import recipes

    assert RunConfig().validate() == RunConfig()
    assert recipes.recipe("frozen-acquisition") == RunConfig()  # the package defaults are a named recipe
    for name in recipes.names():
        recipes.recipe(name).validate()


@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs"), ("data.val_fraction=1", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"), ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"),
    ("train.patience=-1", "train.patience"), ("train.label_smoothing=1", "train.label_smoothing"),
    ("train.views=0", "train.views"), ("data.image_size=16", "data.image_size"),
    ("train.threshold=median", "train.threshold"), ("train.threshold=1.5", "train.threshold"),
    ("train.threshold=sensitivity:2", "train.threshold"), ("train.unfreeze_at=soon", "train.unfreeze_at"),
    ("train.unfreeze_at=1:3,x", "train.unfreeze_at"), ("model.head=64,relu", "model.head"),
    ("model.backbone=vgg99", "model.backbone"), ("data.augment=mixup", "data.augment"),
    ("data.class_weights=auto", "data.class_weights"), ("model.batchnorm=off", "model.batchnorm"),
    ("train.schedule=step", "train.schedule"), ("train.precision=64", "train.precision"),
    ("model.unfreeze_blocks=-2", "model.unfreeze_blocks"), ("train.devices=0", "train.devices"),
    ("data.batch_size=0", "data.batch_size"), ("out_dir=", "out_dir"),
    ("train.unsure=conformal:1", "train.unsure"), ("train.unsure=maybe", "train.unsure"),
    ("train.unsure=conformal:x", "train.unsure"),
])
def test_each_bad_setting_is_one_line_naming_it(override, key):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(RunConfig(), [override])
    message = str(exc.value)
    assert (message.startswith(f"{key}: ") or f"({key})" in message) and "\n" not in message
    assert isinstance(exc.value, UserError) and isinstance(exc.value, ValueError)


def test_the_backbone_error_lists_the_valid_names():
    with pytest.raises(ConfigError, match="valid: mobilenet_v2, resnet18"):
        apply_overrides(RunConfig(), ["model.backbone=vgg99"])


def test_overrides_take_the_field_types():
    parsed = parse_overrides(["train.lr=3e-4", "train.epochs=3", "data.strict=yes", "train.feature_cache=false",
                              "model.backbone_weights=none", "train.threshold=0.5", "name=x", "out_dir=o"])
    assert parsed == {"train": {"lr": 3e-4, "epochs": 3, "feature_cache": False, "threshold": "0.5"},
                      "data": {"strict": True}, "model": {"backbone_weights": "none"}, "name": "x", "out_dir": "o"}
    assert parse_overrides({"train.lr": 1, "train.threshold": 0.5}) == {"train": {"lr": 1.0, "threshold": "0.5"}}


@pytest.mark.parametrize("item, message", [
    ("train.lr", "section.field=value"), ("lr=1", "unknown setting 'lr'"), ("train.nope=1", "unknown setting"),
    ("train.epochs=2.5", "train.epochs: expected an integer"), ("train.lr=fast", "train.lr: expected a number"),
    ("data.strict=maybe", "data.strict: expected true or false"), ("=1", "section.field=value"),
])
def test_bad_overrides_say_why(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [item])


def test_apply_overrides_keeps_the_input_and_later_items_win():
    base = RunConfig()
    out = apply_overrides(base, ["train.lr=3e-4", "data.augment=seed", "train.lr=1e-2"])
    assert (out.train.lr, out.data.augment) == (1e-2, "seed") and base.train.lr == 1e-3
    # a partial dict (a recipe, a grid entry) stays a dict, merged section by section
    assert apply_overrides({"train": {"epochs": 2}}, ["train.lr=1"]) == {"train": {"epochs": 2, "lr": 1.0}}


def test_from_dict_reads_yaml_scalars_at_the_field_types_and_rejects_wrong_types():
    c = RunConfig.from_dict({"train": {"precision": 32, "threshold": 0.5, "lr": 1}})
    assert (c.train.precision, c.train.threshold, c.train.lr) == ("32", "0.5", 1.0)
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        RunConfig.from_dict({"train": {"epochs": True}})
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        RunConfig.from_dict({"train": {"epochs": "8"}})
    with pytest.raises(ConfigError, match="unknown TrainConfig keys"):
        RunConfig.from_dict({"train": {"epoch": 8}})
    with pytest.raises(ConfigError, match="unknown config keys"):
        RunConfig.from_dict({"training": {}})


def test_every_field_has_a_key_and_a_default():
    keys = config.field_names()
    assert "train.lr" in keys and "out_dir" in keys and "data" not in keys
    assert len(keys) == sum(len(dataclasses.fields(k)) for k in (config.DataConfig, config.ModelConfig,
                                                                  config.TrainConfig)) + 2
    assert config.default("train.epochs") == 30 and config.setting_type("train.lr") is float
