"""UNSURE on every face (predict CSV, API JSON, evaluate), and ``pneumoscan adapt``."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from pneumoscan.modeling import artifact
from pneumoscan.cli import app as cli
from pneumoscan.evaluation import evaluate
from pneumoscan.core import calibration, metrics
from pneumoscan.commands import predict
from pneumoscan.core.files import file_sha256


def rewrite(src, dst, **changes):
    """A copy of model ``src`` whose meta has ``changes`` (weights untouched)."""
    blob = artifact.read(src)
    meta = artifact.ModelMeta.from_dict(blob["meta"]).replace(**changes)
    torch.save({"format": artifact.FORMAT, "meta": meta.to_dict(), "state_dict": blob["state_dict"]}, dst)
    return dst


def brightness_resnet18():
    """A ResNet-18 whose weights are set by hand, not drawn: its logit is a fixed, increasing
    function of how bright the film is (the stem's centre tap passes the normalised pixel to
    channel 0, every residual branch is zero, the downsampling shortcuts pass channels through,
    BatchNorm is the identity, and the head reads channel 0). Scores that differ between films and
    a fixed order, without a random network deciding them."""
    from pneumoscan.modeling import models

    model, info = models.build("resnet18", weights="none", head="linear")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
        stem, stem_bn = model.features[0][0], model.features[0][1]
        stem.weight[0, :, 3, 3] = 1 / 3  # three identical channels: their mean is the normalised pixel
        stem_bn.bias[0] = 3.0  # normalised pixels are above -2.2: the ReLUs never clip channel 0
        for module in model.features.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):  # downsample shortcuts
                for c in range(module.in_channels):
                    module.weight[c, c, 0, 0] = 1.0
        head = model.head[-1]
        head.weight[0, 0], head.bias[0] = 4.0, -12.0  # logit 4 (mean pixel - 3)
    return model.eval(), info


@pytest.fixture(scope="module")
def banded(tmp_path_factory, tiny_dataset_module):
    """A hand-set model (``brightness_resnet18``) with its threshold at the median of the test
    films' probabilities and a band around the middle of them."""
    model, info = brightness_resnet18()
    meta = artifact.make_meta(architecture="resnet18", head="linear", image_size=48, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    path = artifact.save(tmp_path_factory.mktemp("banded") / "model.pt", model, meta)
    rows, _ = predict.predict_files(path, [tiny_dataset_module / "test"], engine="torch")
    p = np.sort([r.probability for r in rows])
    assert np.unique(p).size == 12
    threshold = float(p[5] + p[6]) / 2
    c_low, c_high = float(p[2] + p[3]) / 2, float(p[8] + p[9]) / 2  # between films: no rounding at an edge
    band = {"low": c_low, "high": c_high, "conformal_low": c_low, "conformal_high": c_high,
            "method": "mondrian-conformal", "confidence": 0.9, "n_calibration": 10,
            "class_counts": {"NORMAL": 5, "PNEUMONIA": 5}, "fitted_on": "validation split"}
    return rewrite(path, path, unsure=band, threshold=threshold), band


def test_the_hand_set_model_scores_brightness():
    model, _ = brightness_resnet18()
    ramp = torch.linspace(0.0, 1.0, 6).view(6, 1, 1, 1).expand(6, 1, 48, 48).contiguous()
    logits = model(ramp).detach().numpy()
    assert (np.diff(logits) > 0).all()  # brighter, higher: the order the fixture relies on


@pytest.fixture(scope="module")
def tiny_dataset_module(tmp_path_factory):
    from conftest import make_dataset

    return make_dataset(tmp_path_factory.mktemp("d") / "chest_xray", {"train": (20, 20), "test": (6, 6)})


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_predict_csv_labels_unsure_inside_the_band(banded, tiny_dataset_module, capsys):
    path, band = banded
    code, out = run_cli(capsys, "predict", "--model", path, "--engine", "torch", tiny_dataset_module / "test")
    assert code == 0, out.err
    rows = list(csv.DictReader(io.StringIO(out.out)))
    exact = {r.path: r for r in predict.predict_files(path, [tiny_dataset_module / "test"], engine="torch")[0]}
    assert len(rows) == 12
    for r in rows:
        p = exact[r["path"]].probability  # the CSV rounds to 6 decimals; the tiny model's scores are that close
        inside = band["low"] <= p < band["high"]
        assert (r["label"] == "UNSURE") == inside and exact[r["path"]].decided == (not inside)
        assert r["prediction"] == str(int(p >= float(r["threshold"])))  # the threshold's class, UNSURE too
    assert 1 <= sum(r["label"] == "UNSURE" for r in rows) < 12


def test_api_says_unsure_and_shows_the_band(banded, tiny_dataset_module):
    from pneumoscan.serve.app import create_app

    path, band = banded
    with TestClient(create_app(path, api_key=None, engine="torch")) as client:
        card = client.get("/v1/model").json()
        assert card["unsure"]["low"] == band["low"] and card["unsure"]["high"] == band["high"]
        assert card["unsure"]["confidence"] == 0.9 and "UNSURE" in card["unsure"]["meaning"]
        files = sorted((tiny_dataset_module / "test").rglob("*.jpeg"))
        r = client.post("/v1/predict/batch", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    assert {x["label"] for x in results} <= {"NORMAL", "PNEUMONIA", "UNSURE"}
    for x in results:
        inside = band["low"] <= x["probability"] < band["high"]
        assert (x["label"] == "UNSURE") == inside and x["decided"] == (not inside)
        assert x["prediction"] == int(x["probability"] >= x["threshold"])
    assert any(x["label"] == "UNSURE" for x in results)


def test_evaluate_writes_the_selective_block(banded, tiny_dataset_module, tmp_path):
    path, band = banded
    evaluate.run(path, tiny_dataset_module, tmp_path / "e", errors=0, engine="torch", n_bootstrap=20, report=True)
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    sel = result["selective"]
    with open(tmp_path / "e" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    unsure = [r for r in rows if r["decision"] == "UNSURE"]
    assert sel["n"] == 12 and sel["n_decided"] == 12 - len(unsure) and 0 < len(unsure) < 12
    assert sel["coverage"] == pytest.approx(sel["n_decided"] / 12) and sel["band"] == [band["low"], band["high"]]
    assert sum(sel["undecided_by_class"].values()) == len(unsure)
    decided = [r for r in rows if r["decision"] != "UNSURE"]
    correct = sum(int(r["prediction"]) == int(r["label"]) for r in decided)
    assert sel["accuracy"] == pytest.approx(correct / len(decided))
    assert sel["accuracy_ci95"] == pytest.approx(list(metrics.proportion_ci(correct, len(decided))))
    html = (tmp_path / "e" / "report.html").read_text()
    assert "Decided films (UNSURE band)" in html and f"{sel['n_decided']} of 12" in html


# --- adapt ----------------------------------------------------------------------------------------

def test_adapt_writes_a_shifted_copy_that_predict_applies(trained_model, tiny_dataset_module, tmp_path, capsys):
    meta = artifact.read_meta(trained_model)
    assert 0 < meta.prior["calibration"] < 1 and meta.prior["calibration_source"] == "validation split"
    assert 0 < meta.prior["effective"] < 1
    before = file_sha256(trained_model)
    images = tiny_dataset_module / "test" / "PNEUMONIA"  # an all-pneumonia "site"
    code, out = run_cli(capsys, "adapt", "--model", trained_model, "--images", images, "--out", tmp_path / "m2.pt",
                        "--bootstrap", 50)
    assert code == 0, out.err
    assert "site prevalence" in out.out and "95% CI" in out.out and "logit offset" in out.out
    assert file_sha256(trained_model) == before  # the input is never written
    adapted = artifact.read_meta(tmp_path / "m2.pt")
    p = adapted.prior
    # (this tiny model scores every film alike, so the estimate itself means little: metrics' tests check EM)
    assert p["method"] == "em" and p["n_images"] == 6 and 0 < p["site"] < 1 and p["ci"][0] <= p["ci"][1]
    assert p["logit_offset"] == pytest.approx(math.log(p["site"] / (1 - p["site"]))
                                              - math.log(p["effective"] / (1 - p["effective"])))
    assert p["calibration"] == meta.prior["calibration"] and p["effective"] == meta.prior["effective"]
    assert adapted.threshold == meta.threshold  # rule 0.5: a probability cut stays put
    # predict applies the offset: same films, logits shifted by exactly Δ
    old, _ = predict.predict_files(trained_model, [images], engine="torch")
    new, _ = predict.predict_files(tmp_path / "m2.pt", [images], engine="torch")
    for a, b in zip(old, new):
        assert b.logit == pytest.approx(a.logit + p["logit_offset"], abs=1e-5)
        assert b.probability == pytest.approx(float(metrics.sigmoid(a.logit + p["logit_offset"])), abs=1e-6)
    # the model card says so
    from pneumoscan.serve.card import model_card

    card = model_card(adapted, sha256="x", runtime="torch")
    assert card["prevalence"]["site"] == p["site"] and "EM" in card["prevalence"]["meaning"]


def test_a_prevalence_independent_threshold_keeps_its_logit():
    from pneumoscan.safety import adapt

    meta = artifact.ModelMeta(architecture="resnet18", head="seed", image_size=32,
                              normalization=artifact.Normalization("imagenet", (0.5,), (0.5,)), threshold=0.4,
                              threshold_rule="youden", prior={"calibration": 0.5},
                              unsure={"low": 0.3, "high": 0.5, "conformal_low": 0.3, "conformal_high": 0.5,
                                      "confidence": 0.9})
    new = adapt.adapted_meta(meta, calibration=0.5, calibration_source="validation split", threshold0=0.4,
                             band0=meta.unsure, site=0.2, ci=(0.1, 0.3), n_images=10, extra={})
    delta = calibration.prior_offset(0.2, 0.5)
    assert float(metrics.logit(new.threshold)) == pytest.approx(float(metrics.logit(0.4)) + delta)
    assert float(metrics.logit(new.unsure["conformal_low"])) == pytest.approx(float(metrics.logit(0.3)) + delta)
    assert new.unsure["low"] <= new.threshold < new.unsure["high"]
    # adapting again starts from the calibration scale, not from the shifted values
    again = adapt.adapted_meta(new, calibration=0.5, calibration_source="validation split",
                               threshold0=new.prior["calibration_threshold"], band0=adapt.calibration_band(new),
                               site=0.2, ci=(0.1, 0.3), n_images=10, extra={})
    assert again.threshold == pytest.approx(new.threshold) and again.unsure["low"] == pytest.approx(new.unsure["low"])


def test_adapt_refits_on_labelled_films_and_warns_when_they_are_few(trained_model, tiny_dataset_module, tmp_path,
                                                                   capsys):
    code, out = run_cli(capsys, "adapt", "--model", trained_model, "--images", tiny_dataset_module / "test",
                        "--labels", tiny_dataset_module / "test", "--out", tmp_path / "m3.pt", "--bootstrap", 20)
    assert code == 0, out.err
    assert "warning: only 6 labelled NORMAL films" in out.err and "Wilson 95% CI of ±0.05" in out.err
    meta = artifact.read_meta(tmp_path / "m3.pt")
    assert meta.prior["calibration"] == 0.5 and meta.prior["n_calibration"] == 12
    assert meta.prior["films_needed"]["NORMAL"] > 6
    model, loaded = artifact.load(tmp_path / "m3.pt")
    assert float(model.temperature) == pytest.approx(loaded.temperature)


def test_adapt_mistakes_are_one_line(trained_model, tiny_dataset_module, tmp_path, capsys):
    cases = [
        (["--images", tmp_path / "nowhere", "--out", tmp_path / "o.pt"], "nowhere"),
        (["--images", tiny_dataset_module / "test", "--out", trained_model], "never changes the input"),
    ]
    legacy = tmp_path / "legacy.pt"
    blob = artifact.read(trained_model)
    meta = {k: v for k, v in blob["meta"].items() if k not in ("prior", "unsure")}
    torch.save({"format": artifact.FORMAT, "meta": meta, "state_dict": blob["state_dict"]}, legacy)
    for extra, message in cases:
        code, out = run_cli(capsys, "adapt", "--model", trained_model, *extra)
        assert code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    code, out = run_cli(capsys, "adapt", "--model", legacy, "--images", tiny_dataset_module / "test",
                        "--out", tmp_path / "o.pt")
    assert code == 2 and "--train-prior" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = run_cli(capsys, "adapt", "--model", legacy, "--images", tiny_dataset_module / "test",
                        "--out", tmp_path / "o.pt", "--train-prior", "0.5", "--bootstrap", 10)
    assert code == 0 and artifact.read_meta(tmp_path / "o.pt").prior["calibration_source"] == "--train-prior"


def test_adapt_an_onnx_file(banded, tiny_dataset_module, tmp_path, capsys):
    from pneumoscan.inference.engines import OnnxEngine
    from pneumoscan.inference.onnx_export import export_onnx

    path, _ = banded
    source = rewrite(path, tmp_path / "m.pt", prior={"calibration": 0.5, "effective": 0.5})
    onnx_path = export_onnx(source, tmp_path / "m.onnx")
    before = file_sha256(onnx_path)
    code, out = run_cli(capsys, "adapt", "--model", onnx_path, "--images", tiny_dataset_module / "test",
                        "--out", tmp_path / "a.onnx", "--bootstrap", 20)
    assert code == 0, out.err
    assert file_sha256(onnx_path) == before
    old, new = OnnxEngine(onnx_path), OnnxEngine(tmp_path / "a.onnx")
    delta = new.meta.prior["logit_offset"]
    assert new.meta.prior["method"] == "em" and delta != 0
    images = np.stack([np.asarray(__import__("PIL.Image").Image.open(f).convert("L").resize((48, 48)))
                       for f in sorted((tiny_dataset_module / "test").rglob("*.jpeg"))[:4]])
    np.testing.assert_allclose(new.predict_logits(images), old.predict_logits(images), atol=1e-6)  # same graph
    np.testing.assert_allclose(new.predict_proba(images), metrics.sigmoid(old.predict_logits(images) + delta),
                               atol=1e-6)
    for args, message in ((["--labels", tiny_dataset_module / "test", "--out", tmp_path / "b.onnx"], "--labels"),
                          (["--out", tmp_path / "b.pt"], "suffix")):
        code, out = run_cli(capsys, "adapt", "--model", onnx_path, "--images", tiny_dataset_module / "test", *args)
        assert code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1
