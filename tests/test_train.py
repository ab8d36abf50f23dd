import csv
import json

import pytest
import torch
import yaml

from pneumoscan import artifact, data, train
from pneumoscan.config import RunConfig
from pneumoscan.errors import UserError


def tiny_config(root, out, **train_kw) -> RunConfig:
    config = RunConfig()
    config.data.root = str(root)
    config.data.image_size = 48
    config.data.val_fraction = 0.25
    config.data.batch_size = 8
    config.model.backbone_weights = "none"
    config.train.precision = "32"
    config.train.epochs = 1
    config.out_dir = str(out)
    config.name = "run"
    for k, v in train_kw.items():
        setattr(config.train, k, v)
    return config


def test_fit_writes_a_self_describing_run_folder(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs"))
    for name in ("config.yaml", "manifest.csv", "skipped.csv", "history.csv", "curves.png", "model.pt",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "validation/metrics.json", "test/metrics.json"):
        assert (run / name).is_file(), name
    # the manifest holds every file once, and no patient is in two splits
    samples = data.read_manifest(run / "manifest.csv")
    assert len(samples) == 52
    splits_of = {}
    for s in samples:
        splits_of.setdefault(s.patient, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of.values())
    assert {s.split for s in samples} == {"train", "val", "test"}
    # the config round-trips
    assert RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())).data.root == str(tiny_dataset)
    _, meta = artifact.load(run / "model.pt")
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["threshold_rule"] == "youden"
    assert meta["temperature"] > 0 and meta["training"]["epochs_run"] == 1
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    for col in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_precision", "val_recall", "val_auc"):
        assert row[col] != "", col
    test = json.loads((run / "test" / "metrics.json").read_text())
    assert test["n"] == 12 and test["threshold"] == pytest.approx(meta["threshold"])


def test_training_learns_the_synthetic_signal(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=6, lr=3e-3, threshold="0.5")
    config.model.backbone = "resnet18"
    config.model.unfreeze_blocks = -1
    config.data.augment = "none"
    config.train.backbone_lr = 3e-3
    run = train.fit(config)
    val = json.loads((run / "validation" / "metrics.json").read_text())
    assert val["roc_auc"] > 0.8


def test_resume_continues_from_last_checkpoint(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = train.fit(RunConfig(), resume_dir=run)
    assert resumed == run
    _, meta = artifact.load(run / "model.pt")
    assert meta["training"]["epochs_run"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] >= 1
    with open(run / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # the first session's epoch is kept


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot resume"):
        train.fit(RunConfig(), resume_dir=tmp_path)


def test_threshold_rule_comes_from_validation(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs", threshold="sensitivity:0.95"))
    _, meta = artifact.load(run / "model.pt")
    val = json.loads((run / "validation" / "metrics.json").read_text())
    assert val["recall"] >= 0.95 and meta["threshold_rule"] == "sensitivity:0.95"


def test_fast_path_caches_features_and_matches_slow_path_shape(tiny_dataset, tmp_path, caplog):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=2)
    config.train.views = 2
    fast = train.fit(config)
    assert list((tmp_path / "runs" / ".feature-cache").glob("features-*.pt"))
    config.name = "again"
    with caplog.at_level("INFO", logger="pneumoscan.features"):
        train.fit(config)
    assert "from cache" in caplog.text
    config.name, config.train.feature_cache = "slow", False
    slow = train.fit(config)
    for run in (fast, slow):
        assert json.loads((run / "validation" / "metrics.json").read_text())["n"] > 0
        _, meta = artifact.load(run / "model.pt")
        assert meta["training"]["epochs_run"] == 2
