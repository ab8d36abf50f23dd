"""report.html: one self-contained page with every section, its images embedded."""

import base64
import json
import re
import shutil
from html import unescape

import pytest

from pneumoscan.modeling import artifact
from pneumoscan.cli import app as cli
from pneumoscan.evaluation import report

SECTIONS = ("summary", "data", "configuration", "training", "metrics", "curves", "calibration", "errors",
            "subtypes", "model-card")


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _assert_self_contained(html: str) -> None:
    assert 'src="http' not in html and "<link" not in html and "<script" not in html
    assert "http://" not in html and "https://" not in html and "url(" not in html and "@import" not in html
    for src in re.findall(r'src="([^"]*)"', html):
        assert src.startswith("data:image/png;base64,")


@pytest.fixture(scope="module")
def evaluated(trained_model, tmp_path_factory):
    """`pneumoscan evaluate --report` with threshold 0: every NORMAL test image is a false positive."""
    out = tmp_path_factory.mktemp("eval")
    data_root = artifact.read(trained_model)["meta"]["config"]["data"]["root"]
    code = cli.main(["evaluate", "--model", str(trained_model), "--data", data_root, "--out", str(out),
                     "--report", "--errors", "3", "--method", "gradcam++", "--threshold", "0", "--bootstrap", "50"])
    assert code == 0
    return out


@pytest.mark.slow  # a few seconds; make test runs it
def test_evaluate_report_has_every_section_and_embeds_its_images(evaluated):
    html = (evaluated / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    _assert_self_contained(html)
    pngs = _embedded_pngs(html)
    # confusion, ROC, PR, histogram, reliability, training curves, the false-positive gallery
    assert len(pngs) == 7 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)
    assert (evaluated / "errors" / "false_positive.png").is_file()
    assert not (evaluated / "errors" / "false_negative.png").exists()

    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert "3 shown of 6" in html and "None at this threshold" in html  # 6 NORMAL test images, k=3
    assert "Kermany" in html and "not a diagnosis" in html.lower() and "not validated on adults" in html.lower()
    assert "--threshold" in html  # where the threshold came from
    assert f"{metrics['brier']:.3f}" in html and "Expected calibration error" in html
    for kind in metrics["recall_by_subtype"]:
        assert f"<td>{kind}</td>" in html
    assert "model.backbone" in html and "mobilenet_v2" in html  # configuration from meta.config


def test_train_writes_a_report_for_its_test_split(trained_model):
    run_dir = trained_model.parent
    html = (run_dir / "report.html").read_text()
    _assert_self_contained(html)
    assert "test split of" in html and "on the validation split" in html
    assert (run_dir / "test" / "errors.csv").is_file() and (run_dir / "test" / "reliability.png").is_file()
    assert len(_embedded_pngs(html)) >= 6


def test_report_of_a_model_outside_its_run_folder(evaluated, trained_model, tmp_path):
    lone = shutil.copy(trained_model, tmp_path / "model.pt")
    meta = artifact.read_meta(lone)
    out = report.write_report(evaluated, meta, {"model": str(lone), "data": "d", "split": ["test"]},
                              run_dir=tmp_path, path=tmp_path / "r.html")
    html = out.read_text()
    assert "No training curves" in html and "test split of d" in html
    assert len(_embedded_pngs(html)) == 6  # everything but the curves

    (evaluated / "errors.csv").rename(tmp_path / "errors.csv")  # as after `evaluate --errors 0`
    try:
        html = report.render(report.context(evaluated, meta.replace(config={}), {}))
    finally:
        (tmp_path / "errors.csv").rename(evaluated / "errors.csv")
    assert "Error analysis was not run" in html and "records no training configuration" in html
    assert all(f'<section id="{s}">' in html for s in SECTIONS)


def _meta(**training) -> artifact.ModelMeta:
    from pneumoscan.core.config import RunConfig

    cfg = RunConfig().to_dict()
    cfg["model"]["unfreeze_blocks"] = 0
    return artifact.ModelMeta(architecture="mobilenet_v2", head="seed", image_size=32,
                              normalization=artifact.Normalization("imagenet", (0.5,), (0.5,)), threshold=0.5,
                              threshold_rule="0.5", config=cfg, training=artifact.TrainingInfo(**training))


@pytest.mark.slow  # a few seconds; make test runs it
def test_report_is_honest_about_overlap_intervals_and_shortcuts(tmp_path):
    import numpy as np

    from pneumoscan.evaluation import evaluate

    y = np.array([0] * 10 + [1] * 10)
    p = np.where(y == 1, 0.6, 0.1) + np.linspace(0, 0.3, 20)  # no errors at 0.5
    evaluate.evaluate_predictions(y, p, 0.5, tmp_path, [f"f{i}.png" for i in range(20)], n_bootstrap=50,
                                  extra={"n_in_training_data": 20, "n_checked": 20})
    (tmp_path / "errors.csv").write_text(",".join(evaluate.ERROR_COLUMNS) + "\n")  # as write_errors leaves it
    meta = _meta(fast_path=True, epochs_run=4, best_epoch=2, n_train=90, n_val=10, seconds=3.0,
                 seconds_per_epoch=0.75, feature_seconds=1.0)
    html = unescape(report.render(report.context(tmp_path, meta, {})))
    assert "20 of 20 evaluated files were in this model's training data: these numbers are optimistic" in html
    assert "1.000 – 1.000" not in html and "95% CI 0.722 – 1.000" in html  # Wilson for 10/10, not a bootstrap
    assert "not estimable" in html and "Wilson" in html
    assert "No errors at this threshold" in html
    assert "fast path" not in html and "feature_cache" not in html.split("Full configuration")[0]
    assert "none (frozen; only the head was trained)" in html and "cached backbone features of 8 augmented" in html
    assert "<details>" in html and "train.feature_cache" in html  # every setting, behind a disclosure

    # an error whose map sits on the border is listed, with the heuristic stated
    evaluate.evaluate_predictions(y, p, 0.85, tmp_path, [f"f{i}.png" for i in range(20)], n_bootstrap=50,
                                  extra={"n_in_training_data": None, "n_checked": 20})
    (tmp_path / "errors.csv").write_text(
        "path,label,probability,kind,rank,cam_outside_lungs,cam_on_border\n"
        "a/x.png,0,0.9,false_positive,1,0.8200,0.6100\na/y.png,1,0.1,false_negative,1,0.1000,0.0500\n"
        "a/z.png,1,0.2,false_negative,2,,\n")
    html = unescape(report.render(report.context(tmp_path, meta.replace(config={}, training=artifact.TrainingInfo()),
                                                 {})))
    shortcuts = html.split('id="shortcuts"')[1].split("</div>")[0]
    assert "x.png" in shortcuts and "82.0% outside lungs" in shortcuts and "y.png" not in shortcuts
    assert "two-ellipse lung-field mask" in html
    assert "cannot be checked" in html and "No errors at this threshold" not in html
