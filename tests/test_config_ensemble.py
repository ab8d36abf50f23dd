"""EnsembleConfig: the default model, what a user sets reaching every member, and config.yaml
recording exactly what each member ran (re-runnable, and readable in its former layout)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pneumoscan.cli import app as cli
from pneumoscan.cli import train_commands
from pneumoscan.core import recipes
from pneumoscan.core.config import ConfigError, RunConfig, apply_overrides
from pneumoscan.core.recipes import EnsembleConfig
from pneumoscan.training import train


def from_cli(*argv: str):
    return train_commands.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_the_default_is_an_ensemble_and_its_types_say_so():
    default = EnsembleConfig()
    assert default == recipes.recipe("default") and default.validate() is default
    assert [m.name for m in default.members] == list(recipes.ENSEMBLES["default"])
    assert [(m.model.backbone, m.data.augment, m.train.mixup) for m in default.members] == [
        ("mobilenet_v2", "acquisition", 0.2), ("efficientnet_lite0", "seed", 0.0)]
    assert from_cli("--data", "d") == default.with_settings({"data": {"root": "d"}})


@pytest.mark.parametrize("argv", [["--augment", "acquisition"], ["--set", "data.augment=acquisition"]])
def test_an_explicit_setting_equal_to_the_default_reaches_every_member_and_config_yaml(tmp_path, argv):
    config = from_cli("--data", "d", *argv)
    assert [m.data.augment for m in config.members] == ["acquisition", "acquisition"]  # seed-study-lite0's is seed
    train.write_config(tmp_path, config.placed(tmp_path))
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["kind"] == "ensemble"
    assert [m["data"]["augment"] for m in written["members"]] == ["acquisition", "acquisition"]
    # the members' own recipes stay where the user set nothing
    assert [m["train"]["mixup"] for m in written["members"]] == [0.2, 0.0]


def test_a_config_file_is_applied_to_every_member_and_flags_win(tmp_path):
    (tmp_path / "s.yaml").write_text("data: {augment: acquisition}\ntrain: {epochs: 3}\n")
    config = from_cli("--data", "d", "--config", str(tmp_path / "s.yaml"), "--epochs", "2")
    assert [(m.data.augment, m.train.epochs) for m in config.members] == [("acquisition", 2)] * 2


def test_weights_for_one_backbone_skip_a_member_with_another(caplog):
    caplog.set_level("INFO")
    config = apply_overrides(EnsembleConfig(), ["model.backbone_weights=/w/mobilenet.pth", "train.epochs=2",
                                                "data.image_size=96", "name=ens"])
    first, second = config.members
    assert (first.model.backbone, first.model.backbone_weights) == ("mobilenet_v2", "/w/mobilenet.pth")
    assert (second.model.backbone, second.model.backbone_weights) == ("efficientnet_lite0", "imagenet")
    assert "member seed-study-lite0 keeps its own backbone weights" in caplog.text
    assert first.train.epochs == second.train.epochs == 2 and second.data.image_size == 96
    assert config.name == "ens" and [m.name for m in config.members] == list(recipes.ENSEMBLES["default"])
    # a backbone the user names is every member's, and so are the weights given with it
    both = apply_overrides(EnsembleConfig(), ["model.backbone=resnet18", "model.backbone_weights=/w/r.pth"])
    assert {(m.model.backbone, m.model.backbone_weights) for m in both.members} == {("resnet18", "/w/r.pth")}


@pytest.mark.parametrize("kind", ["ensemble", "single"])
def test_a_run_folders_config_yaml_runs_again_as_it_ran(tmp_path, kind):
    argv = ["--data", "d", "--epochs", "4", "--name", "r"] + (["--recipe", "seed-study"] if kind == "single" else [])
    config = from_cli(*argv)
    ran = config.placed(tmp_path) if kind == "ensemble" else config
    train.write_config(tmp_path, ran)
    again = from_cli("--config", str(tmp_path / "config.yaml"))
    assert again == ran and type(again) is type(config)
    assert train.read_config(tmp_path) == ran  # --resume reads the same
    with pytest.raises(Exception, match="complete config"):
        from_cli("--config", str(tmp_path / "config.yaml"), "--recipe", "seed-study")
    # settings given beside it still apply
    assert from_cli("--config", str(tmp_path / "config.yaml"), "--lr", "0.01") == apply_overrides(ran, ["train.lr=0.01"])


def test_former_config_yaml_files_still_load():
    old = {"data": {"root": "d", "augment": "acquisition"}, "model": {"backbone_weights": "/w.pth"},
           "train": {"members": "frozen-acquisition-mixup,seed-study-lite0", "epochs": 3, "seed": 7},
           "out_dir": "o", "name": "n"}
    config = recipes.load_config(old)
    assert isinstance(config, EnsembleConfig) and (config.out_dir, config.name) == ("o", "n")
    # what those members ran: their recipe, then what differed from the package defaults (so an
    # explicit "acquisition", equal to the default, did not reach seed-study-lite0), weights of
    # another backbone excepted
    assert [(m.name, m.data.augment, m.model.backbone_weights, m.train.epochs, m.train.seed)
            for m in config.members] == [("frozen-acquisition-mixup", "acquisition", "/w.pth", 3, 7),
                                         ("seed-study-lite0", "seed", "imagenet", 3, 7)]
    single = dict(old, train={"members": "", "epochs": 3})
    assert recipes.load_config(single) == RunConfig.from_dict(dict(old, train={"epochs": 3}))
    with pytest.raises(ConfigError, match=r"^train.members: .*describes an ensemble[^\n]*$"):
        RunConfig.from_dict(old)
    assert recipes.load_config({"train": {"epochs": 3}}) is None  # settings, not a run's config
    assert RunConfig.from_dict({"kind": "run", "train": {"epochs": 3}}).train.epochs == 3
    with pytest.raises(ConfigError, match="kind: 'ensemble' describes an ensemble"):
        RunConfig.from_dict({"kind": "ensemble", "members": []})


@pytest.mark.parametrize("change, message", [
    (lambda c: dataclasses.replace(c, members=c.members[:1]), "two or more members"),
    (lambda c: dataclasses.replace(c, members=[c.members[0], c.members[0]]), "its own folder name"),
    (lambda c: dataclasses.replace(c, members=[c.members[0], apply_overrides(c.members[1], ["data.image_size=96"])]),
     r"data.image_size: the members differ"),
    (lambda c: dataclasses.replace(c, members=[c.members[0], apply_overrides(c.members[1], ["train.seed=1"])]),
     r"train.seed: the members differ"),
])
def test_an_ensemble_that_cannot_share_one_split_is_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as exc:
        change(EnsembleConfig()).validate()
    assert "\n" not in str(exc.value)


def test_an_ensemble_file_may_start_members_from_recipes():
    config = recipes.load_config({"kind": "ensemble", "name": "pair",
                                  "members": [{"recipe": "seed-study"}, {"recipe": "finetune", "train": {"epochs": 2}}]})
    assert [(m.name, m.model.unfreeze_blocks, m.train.epochs) for m in config.members] == [
        ("seed-study", 0, 30), ("finetune", -1, 2)]
    with pytest.raises(ConfigError, match=r"members.1: unknown TrainConfig keys"):
        recipes.load_config({"members": [{"recipe": "seed-study"}, {"train": {"epoch": 2}}]})
