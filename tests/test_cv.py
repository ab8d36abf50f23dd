import csv
import json

import pytest

from conftest import make_dataset

from pneumoscan.training import cv
from pneumoscan.io import data
from pneumoscan.core.config import RunConfig

pytestmark = pytest.mark.slow  # most tests here train models (minutes on two cores)


def tiny_cv_config(root, out) -> RunConfig:
    config = RunConfig()
    config.data.root, config.data.image_size, config.data.batch_size = str(root), 32, 8
    config.data.val_fraction = 0.34
    config.model.backbone_weights = "none"
    config.train.epochs, config.train.precision, config.train.views = 1, "32", 1
    config.out_dir, config.name = str(out), "cv"
    return config


def test_folds_are_patient_disjoint_and_cover_every_image_once(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": (20, 20)})
    pool = data.scan(root)
    folds = cv.fold_samples(pool, 3, seed=0, val_fraction=0.25)
    tested = [s.path for f in folds for s in f if s.split == "test"]
    assert sorted(tested) == sorted(s.path for s in pool)
    for f in folds:
        splits_of = {}
        for s in f:
            splits_of.setdefault(s.patient, set()).add(s.split)
        assert all(len(v) == 1 for v in splits_of.values())
        assert {s.split for s in f} == {"train", "val", "test"}


def test_cross_validate_writes_per_fold_and_pooled_metrics(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": (18, 18), "test": (4, 4)})
    config = tiny_cv_config(root, tmp_path / "cv")
    out = cv.cross_validate(config, folds=3)
    summary = json.loads((out / "cv.json").read_text())
    assert len(summary["per_fold"]) == 3
    with open(out / "oof_predictions.csv") as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == 36  # every train image exactly once; the data's test split is never used
    assert not any("/test/" in r["path"] for r in oof)
    assert 0 <= summary["pooled_out_of_fold"]["roc_auc"] <= 1
    assert "mean ± sd" in (out / "cv.md").read_text()


def test_interrupted_cross_validation_keeps_finished_folds(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": (12, 12)})
    config = tiny_cv_config(root, tmp_path / "cv")
    out = cv.cross_validate(config, folds=2)
    kept = (out / "fold1" / "model.pt").stat().st_mtime_ns
    (out / "fold2" / "test" / "predictions.csv").unlink()  # fold 2 "interrupted"
    first = json.loads((out / "cv.json").read_text())
    cv.cross_validate(config, folds=2)
    assert (out / "fold1" / "model.pt").stat().st_mtime_ns == kept
    assert not (out / "fold2-2").exists() and (out / "fold2" / "test" / "predictions.csv").is_file()
    again = json.loads((out / "cv.json").read_text())
    assert again["per_fold"][0] == first["per_fold"][0]
    # another recipe under the same name is not mistaken for finished work
    config.model.head = "linear"
    cv.cross_validate(config, folds=2)
    assert (out / "fold1" / "model.pt").stat().st_mtime_ns != kept


def test_cross_validating_the_default_ensemble_scores_each_fold_with_its_members_ensemble(tmp_path):
    from pneumoscan.modeling import artifact
    from pneumoscan.core import config as cfg
    from pneumoscan.core.recipes import member, recipe

    root = make_dataset(tmp_path / "d", {"train": (12, 12)})
    config = cfg.apply_overrides(recipe("default"), [
        f"data.root={root}", "data.image_size=48", "data.val_fraction=0.34", "data.batch_size=8",
        "model.backbone_weights=none", "train.epochs=1", "train.views=1", "train.precision=32",
        f"out_dir={tmp_path / 'cv'}", "name=cv"])
    members = [m.name for m in config.members]
    out = cv.cross_validate(config, folds=2)
    summary = json.loads((out / "cv.json").read_text())
    assert len(summary["per_fold"]) == 2 and summary["config"] == config.to_dict()
    assert set(summary["members_pooled_out_of_fold"]) == set(members)  # the members on the same patients
    table = (out / "cv.md").read_text()
    assert all(f"| {name} | " in table for name in ["ensemble", *members])
    with open(out / "oof_predictions.csv") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(s.path for s in data.scan(root))
    for k in (1, 2):
        meta = artifact.read_meta(out / f"fold{k}" / "model.pt")
        assert meta.is_ensemble and [m.config["name"] for m in meta.members] == members
        tested = [s.path for s in data.read_manifest(out / f"fold{k}" / "members" / members[0] / "manifest.csv")
                  if s.split == "test"]
        with open(out / f"fold{k}" / "test" / "predictions.csv") as f:
            assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(tested)
        assert not (out / f"fold{k}" / "report.html").exists()  # folds write no report
    # fold 2 interrupted: fold 1's ensemble is kept, fold 2's is trained again
    kept = (out / "fold1" / "model.pt").stat().st_mtime_ns
    (out / "fold2" / "test" / "predictions.csv").unlink()
    cv.cross_validate(config, folds=2)
    assert (out / "fold1" / "model.pt").stat().st_mtime_ns == kept
    assert (out / "fold2" / "test" / "predictions.csv").is_file()
    # other members under the same name are not mistaken for finished work
    config = config.with_settings({})
    config.members[1] = cfg.apply_overrides(member("frozen-acquisition"), [
        f"data.root={root}", "data.image_size=48", "data.val_fraction=0.34", "data.batch_size=8",
        "model.backbone_weights=none", "train.epochs=1", "train.views=1", "train.precision=32"])
    cv.cross_validate(config, folds=2)
    assert (out / "fold1" / "model.pt").stat().st_mtime_ns != kept
