"""The typed ``Evaluation``: what metrics.json and predictions.csv hold, round-tripped; and
cross-validation pooling its folds from the values in memory, not from the folds' files."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset
from pneumoscan.core import metrics
from pneumoscan.core.config import RunConfig
from pneumoscan.evaluation import evaluate
from pneumoscan.evaluation.results import Evaluation, Metrics, Predictions
from pneumoscan.safety import decision
from pneumoscan.training import cv, ensemble
from pneumoscan.training.results import RunResult

# the keys of metrics.json that tests, docs and the report quote
DOCUMENTED_KEYS = {"n", "threshold", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                   "loss", "confusion_matrix", "ci95", "ci_method", "ci_notes", "brier", "ece", "recall_by_subtype"}


def _every_block(tmp_path: Path) -> Evaluation:
    """An evaluation with flags, an UNSURE band, subtypes, extra keys and a nan interval."""
    y = np.array([0] * 12 + [1] * 12)
    p = np.concatenate([np.linspace(0.02, 0.62, 12), np.linspace(0.35, 0.98, 12)])
    paths = [f"IM-{i:04d}-0001.jpeg" for i in range(12)] + [f"person{i}_{'virus' if i % 2 else 'bacteria'}_1.jpeg"
                                                            for i in range(12)]
    flags = [()] * 24
    flags[3] = (decision.NOT_CHEST,)
    flags[20] = (decision.LOW_QUALITY, decision.OUT_OF_DISTRIBUTION)
    unsure = {"low": 0.4, "high": 0.6, "method": "conformal", "confidence": 0.9, "n_calibration": 24}
    return evaluate.evaluate_predictions(y, p, 0.5, tmp_path, paths, n_bootstrap=50, flags=flags, unsure=unsure,
                                         extra={"n_in_training_data": None, "n_checked": 24},
                                         threshold_rule="youden")


def test_an_evaluation_round_trips_through_its_files(tmp_path):
    written = _every_block(tmp_path / "a")
    assert written.flagged is not None and written.selective is not None and written.recall_by_subtype
    loaded = Evaluation.load(tmp_path / "a")
    assert loaded == written
    assert loaded.predictions == written.predictions and loaded.selective == written.selective
    assert loaded.extra == {"n_in_training_data": None, "n_checked": 24} and loaded.threshold_rule == "youden"
    # the files are what to_dict and the rows say, and saving the loaded value writes them again unchanged
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(saved) >= DOCUMENTED_KEYS | {"flagged", "selective"}
    assert saved["confusion_matrix"] == written.metrics.confusion.matrix()
    loaded.save(tmp_path / "b")
    for name in ("metrics.json", "predictions.csv"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()
    with open(tmp_path / "a" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "probability", "prediction", "decision", "flags"]
    assert rows[20]["flags"] == f"{decision.LOW_QUALITY};{decision.OUT_OF_DISTRIBUTION}"
    assert rows[3]["decision"] == decision.NOT_ASSESSED


def _measured(y, prob, paths) -> Evaluation:
    """What evaluate_predictions measures at 0.5, without its plots (the fast tests' Evaluation)."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=float)
    labels = [decision.label_for(q, 0.5, (), None) for q in prob]
    return Evaluation(metrics=Metrics.measure(y, prob, 0.5, n_bootstrap=20), brier=metrics.brier(y, prob),
                      ece=metrics.expected_calibration_error(y, prob), recall_by_subtype={},
                      predictions=Predictions.of(paths, y, prob, 0.5, labels, [()] * len(y)))


def test_nan_metrics_and_a_changed_film_compare_as_the_files_would(tmp_path):
    one_class = _measured(np.zeros(6, int), np.linspace(0.1, 0.9, 6), [f"f{i}.png" for i in range(6)])
    assert math.isnan(one_class.metrics.roc_auc) and "roc_auc" in one_class.metrics.ci_notes
    one_class.save(tmp_path / "a")
    assert Evaluation.load(tmp_path / "a") == one_class  # nan equals nan, as in metrics.json
    renamed = _measured(np.zeros(6, int), np.linspace(0.1, 0.9, 6), [f"g{i}.png" for i in range(6)])
    assert json.dumps(renamed.to_dict()) == json.dumps(one_class.to_dict())
    assert renamed != one_class  # the same metrics on other films


def _fixed_probability(path: str, label: int) -> float:
    """A fixed score per film (no network): a fair separation with some overlap."""
    return round(0.25 + 0.5 * label + 0.3 * ((sum(map(ord, Path(path).name)) % 7) / 6 - 0.5), 4)


def test_cross_validation_pools_the_folds_from_memory(tmp_path, monkeypatch):
    """The fold's training is replaced by fixed scores handed over as a RunResult, and no fold
    writes a file: the summary is still computed, from the values in memory alone."""
    root = make_dataset(tmp_path / "d", {"train": (12, 12)}, size=32)
    handed: dict[str, Evaluation] = {}

    def fit(cfg, *, samples, images, progress, report):  # writes no file at all
        held = [s for s in samples if s.split == "test"]
        handed[cfg.name] = _measured([s.label for s in held], [_fixed_probability(s.path, s.label) for s in held],
                                     [s.path for s in held])
        return RunResult(Path(cfg.out_dir) / cfg.name, {"test": handed[cfg.name]})

    monkeypatch.setattr(ensemble, "fit", fit)
    config = RunConfig()
    config.data.root, config.data.image_size, config.data.val_fraction = str(root), 32, 0.34
    config.out_dir, config.name, config.train.members = str(tmp_path / "cv"), "cv", ""
    out = cv.cross_validate(config, folds=2)

    summary = json.loads((out / "cv.json").read_text())
    assert sorted(handed) == ["fold1", "fold2"]
    for row, name in zip(summary["per_fold"], ("fold1", "fold2")):
        assert row["roc_auc"] == handed[name].metrics.roc_auc and row["n"] == handed[name].n
        assert row["brier"] == handed[name].brier
    with open(out / "oof_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == 24 and all(float(r["probability"]) == _fixed_probability(r["path"], int(r["label"]))
                                  for r in oof)
    y = np.array([int(r["label"]) for r in oof])
    prob = np.array([float(r["probability"]) for r in oof])
    assert summary["pooled_out_of_fold"]["roc_auc"] == pytest.approx(metrics.binary_metrics(y, prob, 0.5)["roc_auc"])


def test_a_run_result_loads_a_finished_ensemble_and_its_members(tmp_path):
    run = tmp_path / "run"
    measured = _measured([0, 1] * 5, np.linspace(0.05, 0.95, 10), [f"f{i}.png" for i in range(10)])
    written = {}
    for where in ("test", "validation", "members/a/test", "members/b/test"):  # told apart by their extra key
        written[where] = dataclasses.replace(measured, extra={"where": where})
        written[where].save(run / where)
    loaded = RunResult.load(run, members=["a", "b"])
    assert loaded.test == written["test"] and loaded.validation == written["validation"]
    assert {name: m.test for name, m in loaded.members.items()} == {"a": written["members/a/test"],
                                                                    "b": written["members/b/test"]}
    assert isinstance(loaded.test.predictions, Predictions) and len(loaded.test.predictions) == 10
