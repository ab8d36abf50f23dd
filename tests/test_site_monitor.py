"""Site report and drift monitor on fixed, deterministic scores (nothing passes by luck)."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest

from pneumoscan.core import metrics
from pneumoscan.evaluation import monitor, site_report
from pneumoscan.evaluation.site_report import SiteFilm
from pneumoscan.modeling import artifact


def films(n_patients=60, per_patient=2):
    """Deterministic films: each patient's films share a read; probabilities on a fixed grid, with
    known errors (every 10th patient is misclassified)."""
    out = []
    for k in range(n_patients):
        read = "PNEUMONIA" if k % 3 else "NORMAL"
        for j in range(per_patient):
            right = k % 10 != 0
            prob = (0.8 + 0.002 * k) if (read == "PNEUMONIA") == right else (0.2 - 0.002 * k)
            label = "PNEUMONIA" if prob >= 0.5 else "NORMAL"
            out.append(SiteFilm(film=f"f{k}-{j}", cluster=f"p{k}", probability=prob, threshold=0.5, label=label,
                                read=read, when=datetime(2026, 10 + k % 2, 1), device="ACME X" if k < 50 else "B"))
    out.append(SiteFilm(film="na", cluster="px", probability=0.9, threshold=0.5, label="NOT_ASSESSED",
                        reason="low_quality"))
    return out


@pytest.mark.slow  # seconds of a real server or model; make test runs it
def test_site_report_counts_and_cluster_intervals(tmp_path):
    fs = films()
    rep = site_report.site_report(fs, n_resamples=300)
    o = rep["overall"]
    assert o["n_read"] == 120 and o["n_clusters"] == 60
    assert o["not_assessed"]["by_reason"] == {"low_quality": 1}
    m = o["metrics"]
    assert m["accuracy"]["value"] == pytest.approx(108 / 120)  # patients 0,10,...,50 wrong: 12 films
    assert m["accuracy"]["ci"][0] < 0.9 < m["accuracy"]["ci"][1]
    # clustering: the CI is wider than a film-level Wilson interval would pretend
    wilson = metrics.proportion_ci(108, 120)
    cluster_width = m["accuracy"]["ci"][1] - m["accuracy"]["ci"][0]
    assert cluster_width > 0.9 * (wilson[1] - wilson[0])
    assert set(rep["by_month"]) == {"2026-10", "2026-11"} and set(rep["by_device"]) == {"ACME X"}
    assert rep["by_device_too_small"] == ["B", "unknown"] and len(rep["disagreements"]) == 12
    site_report.write(rep, fs, tmp_path, "synthetic")
    assert json.loads((tmp_path / "site_report.json").read_text())["overall"]["n_read"] == 120
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in page and "accuracy" in page


def test_site_report_page_escapes_what_the_data_carries(tmp_path):
    """report.html is rendered by evaluation.report (its autoescape, its atomic write): markup in a
    device name, the source or a caption is shown as text, never run."""
    fs = [SiteFilm(film=f"f{k}", cluster=f"p{k}", probability=0.9 if k % 2 else 0.1, threshold=0.5,
                   label="PNEUMONIA" if k % 2 else "NORMAL", read="PNEUMONIA" if k % 3 else "NORMAL",
                   device="<script>alert(1)</script>") for k in range(8)]
    rep = site_report.site_report(fs, n_resamples=20, min_group=1)
    cam = tmp_path / "cam.png"
    from PIL import Image
    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(cam)
    site_report.write(rep, fs, tmp_path / "a", "db <b>", gallery=[('film f3: AI <b>"x"</b>', str(cam))])
    page = (tmp_path / "a" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "db &lt;b&gt;" in page and "<figcaption>film f3: AI &lt;b&gt;&#34;x&#34;&lt;/b&gt;</figcaption>" in page
    assert f"<h2>Disagreements ({len(rep['disagreements'])})</h2>" in page and page.count('alt="Grad-CAM"') == 1
    site_report.write(rep, fs, tmp_path / "b", "db")
    assert "<p>No Grad-CAM gallery" in (tmp_path / "b" / "report.html").read_text()
    assert sorted(q.name for q in (tmp_path / "b").iterdir() if q.name.startswith(".")) == []  # no temp left


def _meta():
    return artifact.read_meta(artifact.BUNDLED_MODEL)


def _validation_like(meta, n, share, contrast=1.0, seed=0):
    """Films drawn (deterministically, by quantile) from the model's validation reference at
    PNEUMONIA share ``share``; ``contrast`` scales the OOD scores' spread as a contrast change would."""
    ref = meta.prior["validation"]
    levels = (np.arange(n) + 0.5) / n
    n_pos = int(round(share * n))
    zp = np.interp(levels[:n_pos] * 0 + (np.arange(n_pos) + 0.5) / max(n_pos, 1),
                   np.linspace(0, 1, len(ref["logit_quantiles_pneumonia"])), ref["logit_quantiles_pneumonia"])
    zn = np.interp((np.arange(n - n_pos) + 0.5) / max(n - n_pos, 1),
                   np.linspace(0, 1, len(ref["logit_quantiles_normal"])), ref["logit_quantiles_normal"])
    q = np.asarray(meta.ood["extra"]["val_score_quantiles"])
    scores = np.interp(np.random.default_rng(seed).permutation(levels), np.linspace(0, 1, q.size), q) * contrast
    z = np.r_[zp, zn]
    return [monitor.WindowFilm(logit=float(v), label="PNEUMONIA" if v > 0 else "NORMAL", ood_score=float(s))
            for v, s in zip(z, scores)]


def test_monitor_quiet_on_validation_like_films():
    meta = _meta()
    result = monitor.monitor(meta, _validation_like(meta, 300, meta.prior["calibration"]), n_bootstrap=200)
    names = {c["name"]: c for c in result["checks"]}
    assert not names["prevalence"]["alert"] and not names["ood_score"]["alert"], monitor.summary(result)
    assert not names["not_assessed_rate"]["alert"] and not names["mean_probability"]["alert"]


def test_monitor_alerts_on_prevalence_change():
    meta = _meta()
    result = monitor.monitor(meta, _validation_like(meta, 300, 0.3), n_bootstrap=200)
    names = {c["name"]: c for c in result["checks"]}
    assert result["alert"] and names["prevalence"]["alert"] and not names["ood_score"]["alert"]
    assert "recalibrate" in names["prevalence"]["action"]


def test_monitor_alerts_on_contrast_change():
    meta = _meta()
    result = monitor.monitor(meta, _validation_like(meta, 300, meta.prior["calibration"], contrast=1.3),
                             n_bootstrap=200)
    names = {c["name"]: c for c in result["checks"]}
    assert result["alert"] and names["ood_score"]["alert"] and not names["prevalence"]["alert"]
    assert "ALERT ood_score" in monitor.summary(result)
