"""The shift suite: every shift keeps shape and type, the table is computed, not invented."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscan.core import calibration
from pneumoscan.evaluation import robustness
from pneumoscan.cli.app import main
from tests.conftest import make_dataset


def test_every_shift_keeps_shape_and_dtype_and_changes_the_film():
    images = np.random.default_rng(0).integers(30, 220, (3, 64, 64), dtype=np.uint8)
    names = [s.name for s in robustness.SUITE]
    assert len(names) == len(set(names))
    for shift in robustness.SUITE:
        out = robustness.apply(shift, images)
        assert out.shape == images.shape and out.dtype == np.uint8, shift.name
        assert not np.array_equal(out, images), shift.name
    # seeded: the same films for every model
    noisy = next(s for s in robustness.SUITE if s.kind == "noise")
    assert np.array_equal(robustness.apply(noisy, images, 3), robustness.apply(noisy, images, 3))


def test_rates_match_sklearn_and_specificity_at_sensitivity():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    r = robustness.rates(y, p, 0.5)
    assert r["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert r["specificity"] == pytest.approx(((p < 0.5) & (y == 0)).sum() / (y == 0).sum())
    cut = calibration.choose_threshold(y, p, "sensitivity:0.95")
    assert (p[y == 1] >= cut).mean() >= 0.95
    assert r["specificity_at_sens95"] == pytest.approx((p[y == 0] < cut).mean())


def test_shift_table_and_worst_case_use_the_scores():
    images = np.random.default_rng(2).integers(0, 256, (8, 48, 48), dtype=np.uint8)
    y = np.array([0, 1] * 4)
    suite = robustness.SUITE[:3]
    calls = []

    def score(a):
        calls.append(a)
        return np.where(y == 1, 0.9, 0.1) if len(calls) == 1 else np.where(y == 1, 0.9, 0.6)

    rows = robustness.shift_table(score, images, y, 0.5, suite=suite)
    assert [r["shift"] for r in rows] == ["none"] + [s.name for s in suite]
    assert rows[0]["specificity"] == 1.0 and rows[1]["specificity"] == 0.0
    worst = robustness.worst_case(rows)
    assert worst["worst_specificity"] == 0.0 and worst["worst_sensitivity"] == 1.0


def test_collection_names_the_file_series():
    assert robustness.collection("a/NORMAL2-IM-0012-0001.jpeg") == "NORMAL2"
    assert robustness.collection("IM-0115-0001.jpeg") == "IM"
    assert robustness.collection("person1_virus_6.jpeg") == "person"
    assert robustness.collection("scan.png") == "other"


@pytest.mark.slow  # a few seconds; make test runs it
def test_robustness_cli_writes_the_table(trained_model, tmp_path, capsys):
    root = make_dataset(tmp_path / "site", {"test": (6, 6)})
    out = tmp_path / "out"
    assert main(["robustness", "--model", str(trained_model), "--data", str(root), "--out", str(out)]) == 0
    result = json.loads((out / "robustness.json").read_text())
    assert len(result["rows"]) == len(robustness.SUITE) + 1 and result["n_images"] == 12
    assert "| jpeg-2 |" in (out / "robustness.md").read_text()
    assert "worst case over 26 shifts" in capsys.readouterr().out


def test_robustness_cli_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["robustness", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
