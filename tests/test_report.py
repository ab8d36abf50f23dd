"""report.html: one self-contained page with every section, its images embedded."""

import base64
import json
import re
import shutil

import pytest

from pneumoscan import artifact, cli, report

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
