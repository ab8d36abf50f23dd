"""The decision layer: NOT_ASSESSED for what the model is not competent for, flags for the rest,
fitted at training time and the same through PyTorch and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset, synthetic_xray
from pneumoscan.modeling import artifact
from pneumoscan.safety import gate
from pneumoscan.commands import predict
from pneumoscan.safety import decision
from pneumoscan.inference.engines import OnnxEngine, TorchEngine
from pneumoscan.inference.onnx_export import export_onnx


def _meta(**ood):
    _, info = __import__("pneumoscan.modeling.models", fromlist=["build"]).build("resnet18", weights="none")
    meta = artifact.make_meta(architecture="resnet18", head="seed", image_size=32, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    return meta.replace(ood={"cutoff_not_chest": 100.0, "cutoff_ood": 50.0, "percentile": 99.5,
                             "ood_percentile": 97.5, **ood})


def test_decide_labels_flags_and_reasons():
    meta = _meta()
    low = [gate.Flag("low_quality", "min_side", "image is 1x1 px")]
    verdicts = decision.decide(meta, np.array([2.0, 2.0, -2.0, 2.0, 0.0]), np.array([10, 70, 150, 10, np.nan]),
                               [[], [], [], low, []])
    assert [v.label for v in verdicts] == ["PNEUMONIA", "PNEUMONIA", "NOT_ASSESSED", "NOT_ASSESSED", "PNEUMONIA"]
    # a far distance says "unlike the training films", not "not a chest film" (tests/test_chest.py)
    assert [v.flags for v in verdicts] == [(), ("out_of_distribution",), ("outside_training_population",),
                                           ("low_quality",), ()]
    assert verdicts[2].prediction is None and verdicts[2].probability == pytest.approx(1 / (1 + np.exp(2)))
    assert "the model is not validated for it" in verdicts[2].details[0]
    assert verdicts[3].details == ("image is 1x1 px",)
    assert verdicts[4].ood_score is None  # NaN: a model without a detector gets no OOD flag
    # without a detector at all, only the gate speaks
    plain = meta.replace(ood=None)
    assert [v.flags for v in decision.decide(plain, np.zeros(2), np.array([1e9, 1e9]), [[], low])] == \
        [(), ("low_quality",)]


@pytest.fixture(scope="module")
def ood_model(tmp_path_factory):
    """A tiny model with enough validation films (>= ood.MIN_VALIDATION) for a detector."""
    from pneumoscan.training import train
    from pneumoscan.core.config import RunConfig

    root = make_dataset(tmp_path_factory.mktemp("data") / "d", {"train": (130, 130), "test": (4, 4)}, size=32)
    config = RunConfig()
    config.data.root, config.data.image_size, config.data.val_fraction = str(root), 32, 0.5
    config.model.backbone, config.model.backbone_weights, config.model.head = "resnet18", "none", "linear"
    config.train.epochs, config.train.max_train_batches, config.train.precision = 1, 2, "32"
    config.out_dir, config.name = str(tmp_path_factory.mktemp("runs")), "ood"
    return train.fit(config, report=False) / "model.pt", root


def test_training_fits_a_detector_that_onnx_computes_too(ood_model, tmp_path):
    path, root = ood_model
    meta = artifact.read_meta(path)
    assert meta.ood["n_val"] >= 100 and meta.ood["cutoff_not_chest"] >= meta.ood["cutoff_ood"] > 0
    assert meta.quality == gate.default_limits(32).to_dict()
    images = np.stack([synthetic_xray(np.random.default_rng(i), i % 2, 32) for i in range(6)])
    torch_logits, torch_scores = TorchEngine(path).assess(images)
    onnx_logits, onnx_scores = OnnxEngine(export_onnx(path, tmp_path / "m.onnx")).assess(images)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3)
    assert np.isfinite(torch_scores).all() and (torch_scores > 0).all()


def test_predict_refuses_what_no_film_looks_like(ood_model, tmp_path):
    path, root = ood_model
    Image.new("L", (1, 1), 200).save(tmp_path / "pixel.png")
    Image.new("L", (4000, 8), 128).save(tmp_path / "strip.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    rows, skipped = predict.predict_files(path, [tmp_path, root / "test"], engine="torch")
    by_name = {r.path.split("/")[-1]: r for r in rows}
    for name in ("pixel.png", "strip.png", "black.png"):
        assert by_name[name].label == "NOT_ASSESSED" and "low_quality" in by_name[name].flags
    # the films: whatever this tiny model's detector makes of them, every label follows from its
    # score and the fitted cut-offs (how many it flags is the detector's business, not this test's)
    films = [r for r in rows if "/test/" in r.path]
    ood = artifact.read_meta(path).ood
    assert len(films) == 8
    for r in films:
        not_chest = r.ood_score is not None and r.ood_score > ood["cutoff_not_chest"]
        unusual = r.ood_score is not None and ood["cutoff_ood"] < r.ood_score <= ood["cutoff_not_chest"]
        assert (r.label == "NOT_ASSESSED") == (not_chest or "low_quality" in r.flags)
        assert ("out_of_distribution" in r.flags) == unusual


def test_evaluate_counts_flagged_images_and_reports_metrics_without_them(ood_model, tmp_path):
    import json
    import shutil

    from pneumoscan.evaluation import evaluate

    path, root = ood_model
    data = shutil.copytree(root / "test", tmp_path / "d")
    Image.new("L", (64, 64), 0).save(data / "NORMAL" / "IM-9999-0001.png")  # an all-black "film"
    evaluate.run(path, data, tmp_path / "out", errors=0, engine="torch", n_bootstrap=50)
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    flagged = result["flagged"]
    assert result["n"] == 9 and flagged["n_not_assessed"] >= 1
    assert flagged["by_flag"]["low_quality"] == {"NORMAL": 1, "PNEUMONIA": 0}
    assert flagged["n_assessed"] + flagged["n_not_assessed"] == 9
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert any("IM-9999-0001.png" in r and "NOT_ASSESSED" in r and "low_quality" in r for r in rows)


def test_report_shows_the_input_checks(ood_model, tmp_path):
    import shutil

    from pneumoscan.evaluation import evaluate

    path, root = ood_model
    data = shutil.copytree(root / "test", tmp_path / "d")
    Image.new("L", (64, 64), 0).save(data / "NORMAL" / "IM-9999-0001.png")
    evaluate.run(path, data, tmp_path / "out", errors=0, engine="torch", n_bootstrap=50, report=True)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Input checks" in html and "came back NOT_ASSESSED" in html and "low_quality" in html


def test_unsure_inside_the_band_and_not_assessed_wins():
    band = {"low": 0.3, "high": 0.6, "method": "mondrian-conformal", "confidence": 0.9}
    meta = _meta().replace(unsure=band)
    low = [gate.Flag("low_quality", "min_side", "image is 1x1 px")]
    z = decision.metrics.logit(np.array([0.2, 0.3, 0.45, 0.55, 0.6, 0.9, 0.5]))
    verdicts = decision.decide(meta, z, np.full(7, 10.0), [[], [], [], [], [], [], low])
    assert [v.label for v in verdicts] == ["NORMAL", "UNSURE", "UNSURE", "UNSURE", "PNEUMONIA", "PNEUMONIA",
                                           "NOT_ASSESSED"]
    assert [v.decided for v in verdicts] == [True, False, False, False, True, True, False]
    # prediction stays the threshold's class, so metrics and the worklist order still work
    assert [v.prediction for v in verdicts] == [0, 0, 0, 1, 1, 1, None]
    # an overridden threshold outside the band widens it: no decided film contradicts the threshold
    moved = decision.decide(meta, decision.metrics.logit(np.array([0.65, 0.75])), np.full(2, 10.0), [[], []],
                            threshold=0.7)
    assert [v.label for v in moved] == ["UNSURE", "PNEUMONIA"]
    # a model without a band (older, or train.unsure=none) never says UNSURE
    legacy = artifact.ModelMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "unsure"})
    assert legacy.unsure is None
    assert [v.label for v in decision.decide(legacy, z[:6], np.full(6, 10.0), [[]] * 6)] == \
        ["NORMAL", "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA"]


def test_the_prior_offset_is_applied_before_the_threshold():
    meta = _meta().replace(prior={"calibration": 0.5, "site": 0.8, "logit_offset": float(np.log(4.0))})
    (v,) = decision.decide(meta, np.array([0.0]), np.array([10.0]), [[]])
    assert v.probability == pytest.approx(0.8) and v.logit == pytest.approx(np.log(4.0)) and v.label == "PNEUMONIA"


def test_unsure_and_prior_round_trip_through_the_meta_dict():
    band = {"low": 0.25, "high": 0.61, "method": "mondrian-conformal", "confidence": 0.95, "n_calibration": 40,
            "class_counts": {"NORMAL": 20, "PNEUMONIA": 20}}
    prior = {"calibration": 0.5, "site": 0.3, "ci": [0.25, 0.35], "method": "em", "n_images": 100,
             "logit_offset": -0.85}
    meta = _meta().replace(unsure=band, prior=prior)
    back = artifact.ModelMeta.from_dict(meta.to_dict())
    assert back == meta and back.unsure == band and back.logit_offset == -0.85 and not back.extra
    assert _meta().logit_offset == 0.0


def test_training_fits_an_unsure_band_that_predict_uses(ood_model, tmp_path):
    path, root = ood_model
    meta = artifact.read_meta(path)
    u = meta.unsure
    assert u["method"] == "mondrian-conformal" and u["confidence"] == 0.95 and u["fitted_on"] == "validation split"
    assert u["low"] <= meta.threshold < u["high"]
    assert u["n_calibration"] == sum(u["class_counts"].values()) == meta.training.n_val
    assert meta.prior["calibration"] == pytest.approx(u["class_counts"]["PNEUMONIA"] / u["n_calibration"])
    rows, _ = predict.predict_files(path, [root / "test"], engine="torch")
    for r in rows:
        inside = u["low"] <= r.probability < u["high"]
        assert (r.label == "UNSURE") == (inside and r.assessed) and r.decided == (r.assessed and not inside)
    # the validation metrics carry the selective block
    import json

    sel = json.loads((path.parent / "validation" / "metrics.json").read_text())["selective"]
    assert sel["n"] == u["n_calibration"] and 0 <= sel["coverage"] <= 1
    assert sel["band"] == [u["low"], u["high"]] and len(sel["accuracy_ci95"]) == 2
