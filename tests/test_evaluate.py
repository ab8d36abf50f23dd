"""Evaluation extras: calibration numbers, recall by subtype, and the most confident errors."""

import csv
import json
import logging
import math

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray
from pneumoscan.modeling import artifact
from pneumoscan.evaluation import evaluate
from pneumoscan.core import metrics


def test_select_errors_picks_the_most_confident_first():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.9, 0.6, 0.2, 0.99, 0.1, 0.45, 0.8, 0.3, 0.6])
    chosen = evaluate.select_errors(y, p, threshold=0.5, k=2)
    assert chosen["false_positive"].tolist() == [3, 0]  # 0.99, 0.9 (0.6 twice left out)
    assert chosen["false_negative"].tolist() == [4, 7]  # 0.1, 0.3

    everything = evaluate.select_errors(y, p, threshold=0.5, k=16)
    assert everything["false_positive"].tolist() == [3, 0, 1, 8]  # ties keep input order
    assert everything["false_negative"].tolist() == [4, 7, 5]
    # the threshold itself counts as positive, as in metrics.binary_metrics
    assert evaluate.select_errors([0], [0.5], 0.5)["false_positive"].tolist() == [0]
    none = evaluate.select_errors([0, 1], [0.1, 0.9], 0.5)
    assert none["false_positive"].size == none["false_negative"].size == 0
    assert evaluate.select_errors(y, p, 0.5, k=0)["false_positive"].size == 0


@pytest.mark.parametrize("name, expected", [
    ("person1_bacteria_2.jpeg", "bacteria"), ("person1000_virus_1681.jpeg", "virus"),
    ("/data/test/PNEUMONIA/person3_Virus_7.png", "virus"), ("IM-0001-0001.jpeg", None),
    ("person1_bacterial_2.jpeg", None), ("viruses.jpeg", None), ("NORMAL2-IM-0135-0001.jpeg", None),
])
def test_subtype_of(name, expected):
    assert evaluate.subtype_of(name) == expected


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_recall_by_subtype_by_hand():
    paths = ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_bacteria_3.jpeg",
             "person3_virus_4.jpeg", "person4_virus_5.jpeg", "IM-0001-0001.jpeg",
             "person5_virus_9.jpeg",  # a NORMAL image named like a virus case: not a recall case
             "scan_without_subtype.png"]
    y = [1, 1, 1, 1, 1, 0, 0, 1]
    p = [0.9, 0.2, 0.7, 0.4, 0.8, 0.9, 0.9, 0.1]
    result = evaluate.recall_by_subtype(paths, y, p, threshold=0.5)
    assert set(result) == {"bacteria", "virus"}
    assert result["bacteria"]["n"] == 3 and result["bacteria"]["recall"] == pytest.approx(2 / 3)
    assert result["virus"]["n"] == 2 and result["virus"]["recall"] == 0.5
    for kind, (k, n) in {"bacteria": (2, 3), "virus": (1, 2)}.items():
        assert result[kind]["ci95"] == pytest.approx(_wilson(k, n), abs=1e-9)
    assert evaluate.recall_by_subtype(["IM-1.jpeg"], [1], [0.9], 0.5) == {}


def test_evaluate_predictions_adds_calibration_and_keeps_keys(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 30)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    paths = [f"IM-{i:04d}-0001.jpeg" if t == 0 else f"person{i}_{'virus' if i % 3 == 0 else 'bacteria'}_1.jpeg"
             for i, t in enumerate(y)]
    result = evaluate.evaluate_predictions(y, p, 0.5, tmp_path, paths, n_bootstrap=50)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) >= {"n", "threshold", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc",
                          "pr_auc", "loss", "confusion_matrix", "ci95", "brier", "ece", "recall_by_subtype"}
    assert saved["brier"] == pytest.approx(metrics.brier(y, p))
    assert saved["ece"] == pytest.approx(metrics.expected_calibration_error(y, p, n_bins=15))
    assert saved["ece"] != pytest.approx(metrics.expected_calibration_error(y, p, n_bins=10))  # 15 bins
    assert saved["recall_by_subtype"]["virus"]["n"] == 10 and saved["recall_by_subtype"]["bacteria"]["n"] == 20
    assert result.brier == saved["brier"] and result.to_dict() == saved
    for png in ("reliability.png", "confusion_matrix.png", "roc.png", "pr.png"):
        assert (tmp_path / png).is_file()


def test_write_errors_lists_and_explains_the_most_confident(trained_model, tmp_path):
    model, meta = artifact.load(trained_model)
    rng = np.random.default_rng(1)
    y = np.array([0, 0, 0, 1, 1, 1])
    images = np.stack([synthetic_xray(rng, int(t), meta.image_size) for t in y])
    prob = np.array([0.9, 0.6, 0.2, 0.1, 0.4, 0.8])
    paths = [f"n{i}.jpeg" for i in range(3)] + [f"person{i}_virus_1.jpeg" for i in range(3)]
    stale = tmp_path / "errors" / "false_positive" / "05_old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")

    galleries = evaluate.write_errors(model, meta, images, y, prob, 0.5, paths, tmp_path, k=1)
    with open(tmp_path / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["label"], r["kind"], r["rank"]) for r in rows] == [
        ("n0.jpeg", "0", "false_positive", "1"), ("person0_virus_1.jpeg", "1", "false_negative", "1")]
    assert float(rows[0]["probability"]) == pytest.approx(0.9)
    for r in rows:  # where each explained map's mass lies (issue 14); empty only for a flat map
        assert all(r[c] == "" for c in ("cam_outside_lungs", "cam_on_border")) or \
            all(0 <= float(r[c]) <= 1 for c in ("cam_outside_lungs", "cam_on_border"))
    assert set(galleries) == {"false_positive", "false_negative"}
    assert not stale.exists()  # overlays of an earlier evaluation are gone
    for kind, stem in (("false_positive", "n0"), ("false_negative", "person0_virus_1")):
        with Image.open(tmp_path / "errors" / f"{kind}.png") as png:
            assert png.format == "PNG"
        assert [p.name for p in (tmp_path / "errors" / kind).iterdir()] == [f"01_{stem}.png"]

    # no errors at all: an empty CSV, no galleries, and the old ones removed
    evaluate.write_errors(model, meta, images, y, np.array([0.1, 0.1, 0.1, 0.9, 0.9, 0.9]), 0.5, paths, tmp_path)
    assert (tmp_path / "errors.csv").read_text().strip() == ",".join(evaluate.ERROR_COLUMNS)
    assert evaluate.ERROR_COLUMNS == ["path", "label", "probability", "kind", "rank", "cam_outside_lungs",
                                      "cam_on_border"]
    assert not list((tmp_path / "errors").rglob("*.png"))


def test_training_overlap_counts_seen_files_by_content(tmp_path, caplog):
    from pneumoscan.core.files import content_digests

    files = []
    for i in range(4):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(f"image {i}".encode())
        files.append(f)
    renamed = tmp_path / "elsewhere.png"
    renamed.write_bytes(b"image 0")  # a training image under another name is still seen
    meta = artifact.ModelMeta(architecture="a", head="h", image_size=8,
                              normalization=artifact.Normalization("imagenet", (0.5,), (0.5,)),
                              threshold=0.5, threshold_rule="0.5", data_digests=tuple(content_digests(files[:2])))
    with caplog.at_level(logging.WARNING, logger="pneumoscan.evaluation.evaluate"):
        assert evaluate.training_overlap(meta, [renamed, files[1], files[2], files[3]]) == {
            "n_in_training_data": 2, "n_checked": 4}
    assert "2 of 4 evaluated files were in this model's training data: these numbers are optimistic" in caplog.text
    caplog.clear()
    assert evaluate.training_overlap(meta, files[2:]) == {"n_in_training_data": 0, "n_checked": 2}
    assert not caplog.text
    with caplog.at_level(logging.WARNING, logger="pneumoscan.evaluation.evaluate"):
        unknown = evaluate.training_overlap(meta.replace(data_digests=()), files)
    assert unknown == {"n_in_training_data": None, "n_checked": 4} and "cannot be checked" in caplog.text


def test_trained_model_records_its_training_and_validation_files(trained_model):
    from pneumoscan.io import data
    from pneumoscan.core.files import content_digest

    meta = artifact.read_meta(trained_model)
    manifest = data.read_manifest(trained_model.parent / "manifest.csv")
    seen = {content_digest(s.path) for s in manifest if s.split in ("train", "val")}
    assert set(meta.data_digests) == seen and list(meta.data_digests) == sorted(meta.data_digests)
    assert not {content_digest(s.path) for s in manifest if s.split == "test"} & seen
