"""The silent pilot end to end on a real SQLite result store with synthetic films and fixed scores:
films and results in the store -> reads via the API (with a correction) and a CSV import ->
site-report with intervals -> adapt --db with a sensitivity floor (a new registered version) ->
the new version's answers on the next films -> drift monitor quiet on validation-like films and
alerting on a prevalence change and on a contrast change (exit status 1)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from scipy.stats import norm

from pneumoscan.cli.app import main
from pneumoscan.core import calibration, metrics
from pneumoscan.core.files import file_sha256
from pneumoscan.modeling import artifact
from pneumoscan.serve.pilot import pilot_routes
from pneumoscan.store import FilmHeader, Store

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)


@pytest.fixture()
def bundled():
    meta = artifact.read_meta(artifact.BUNDLED_MODEL)
    return meta, file_sha256(artifact.BUNDLED_MODEL)


def add_films(store, sha, meta, logits, ood, *, start=0, start_time=T0, prefix="S"):
    """One study (patient) per film; results as the bundled model would record them."""
    ids = []
    for i, (z, score) in enumerate(zip(logits, ood), start=start):
        up = store.upsert_film(FilmHeader(study_instance_uid=f"1.2.3.{prefix}{i}", sop_instance_uid=f"1.2.3.{prefix}{i}.1",
                                          modality="DX", manufacturer="ACME", manufacturer_model="X1",
                                          accession_number=f"{prefix}{i}", patient_id=f"P{prefix}{i}"),
                               None, received_at=start_time + timedelta(minutes=i))
        p = float(metrics.sigmoid(z))
        low, high = meta.unsure["low"], meta.unsure["high"]
        label = "UNSURE" if low <= p < high else ("PNEUMONIA" if p >= meta.threshold else "NORMAL")
        store.record_result(up.film.id, sha, probability=p, label=label, threshold=meta.threshold,
                            ood_score=float(score), scored_at=start_time + timedelta(minutes=i))
        ids.append(up.film.study_id)
    return ids


def site_films(n=160):
    """Fixed calibrated logits of a site where the model's cut is off: its normals score too high
    (as the bundled model on the later collection: specificity 0.67). 60% PNEUMONIA."""
    k = np.arange(n)
    y = (k % 5 < 3).astype(int)
    grid = ((k * 37) % n + 0.5) / n
    z = np.where(y == 1, 4.0 + 1.5 * norm.ppf(grid), 0.8 + 1.5 * norm.ppf(grid))
    return z, y


def validation_like(meta, n, share, contrast=1.0):
    ref = meta.prior["validation"]
    n_pos = int(round(share * n))
    lv = lambda m: (np.arange(m) + 0.5) / max(m, 1)  # noqa: E731
    zp = np.interp(lv(n_pos), np.linspace(0, 1, len(ref["logit_quantiles_pneumonia"])), ref["logit_quantiles_pneumonia"])
    zn = np.interp(lv(n - n_pos), np.linspace(0, 1, len(ref["logit_quantiles_normal"])), ref["logit_quantiles_normal"])
    q = np.asarray(meta.ood["extra"]["val_score_quantiles"])
    scores = np.interp(np.random.default_rng(1).permutation(lv(n)), np.linspace(0, 1, q.size), q) * contrast
    return np.r_[zp, zn], scores


@pytest.mark.slow
def test_pilot_loop(tmp_path, bundled, capsys):
    meta, sha = bundled
    db = f"sqlite:///{tmp_path / 'pilot.db'}"
    z, y = site_films()
    with Store.open(db) as store:
        store.register_model(sha, "pneumoscan", "bundled")
        studies = add_films(store, sha, meta, z, np.full(z.size, 1000.0))
        # reads through the API: the first 40 studies, one read wrong then corrected
        app = FastAPI()
        app.state.store = store
        app.include_router(pilot_routes([], None, keyed=False))
        client = TestClient(app)
        truth = {0: "NORMAL", 1: "PNEUMONIA"}
        first = client.post(f"/v1/studies/{studies[0]}/read", json={"label": truth[1 - y[0]], "reader": "dr a"})
        assert first.status_code == 201
        for sid, label in zip(studies[:40], y[:40]):
            assert client.post(f"/v1/studies/{sid}/read", json={"label": truth[label], "reader": "dr a"}).status_code == 201
        history = client.get(f"/v1/studies/{studies[0]}/reads").json()["reads"]
        assert [r["current"] for r in history] == [False, True] and history[1]["label"] == truth[y[0]]
        assert client.post(f"/v1/studies/{studies[1]}/read", json={"label": "NORMAL"}).status_code == 422
        assert client.post("/v1/studies/99999/read", json={"label": "NORMAL", "reader": "x"}).status_code == 404
        assert client.put("/v1/shadow", json={"on": True, "by": "pilot lead"}).json() == {"shadow_mode": True}
        assert store.get_setting("shadow_mode") == "on"
    # the rest through a CSV from the RIS
    rows = "\n".join(f"S{i},{truth[y[i]]}" for i in range(40, z.size))
    (tmp_path / "reads.csv").write_text("accession,label\n" + rows + "\nNOPE,NORMAL\n")
    assert main(["reads", "import", str(tmp_path / "reads.csv"), "--db", db, "--reader", "ris"]) == 0
    assert "120 reads recorded; 1 rows matched no film" in capsys.readouterr().out

    # site report: intervals around the (too low) specificity
    assert main(["site-report", "--db", db, "--out", str(tmp_path / "site"), "--bootstrap", "300"]) == 0
    report = json.loads((tmp_path / "site" / "site_report.json").read_text())
    m = report["overall"]["metrics"]
    assert report["overall"]["n_read"] == 160
    assert m["specificity"]["ci"][0] < m["specificity"]["value"] < m["specificity"]["ci"][1] < 0.8
    assert (tmp_path / "site" / "report.html").stat().st_size > 10_000

    # recalibration with the sensitivity floor: a new version, registered with its parent
    out = tmp_path / "m2.pt"
    assert main(["adapt", "--db", db, "--out", str(out), "--sensitivity-floor", "0.95", "--bootstrap", "300"]) == 0
    printed = capsys.readouterr().out
    assert "out-of-fold" in printed and "more reads" in printed
    new = artifact.read_meta(out)
    new_sha = file_sha256(out)
    assert new_sha != sha and new.prior["recalibrated"]["parent_sha256"] == sha
    assert new.threshold_rule == "sensitivity:0.95"
    with Store.open(db) as store:
        assert {v.sha256: v.parent_sha256 for v in store.model_versions()}[new_sha] == sha
    # the new version on the next films (same raw logits, its own temperature and threshold):
    # out of fold it keeps the floor's sensitivity and calls fewer normals PNEUMONIA than the old cut
    raw = z * meta.temperature
    p_new = metrics.sigmoid(raw / new.temperature)
    oof = new.prior["recalibrated"]["out_of_fold"]
    assert oof["sensitivity"]["value"] >= 0.9
    assert np.mean(p_new[y == 0] >= new.threshold) < np.mean(metrics.sigmoid(z)[y == 0] >= meta.threshold)
    with Store.open(db) as store:
        nxt = add_films(store, new_sha, new, raw[:5] / new.temperature, np.full(5, 1000.0), prefix="N")
        assert store.study(nxt[0]).films[0].results[0].model.sha256 == new_sha


@pytest.mark.slow
@pytest.mark.parametrize("share,contrast,alert,which", [(None, 1.0, False, None), (0.3, 1.0, True, "prevalence"),
                                                        (None, 1.3, True, "ood_score")])
def test_monitor_on_store(tmp_path, bundled, capsys, share, contrast, alert, which):
    meta, sha = bundled
    db = f"sqlite:///{tmp_path / 'drift.db'}"
    z, scores = validation_like(meta, 300, share or meta.prior["calibration"], contrast)
    with Store.open(db) as store:
        store.register_model(sha, "pneumoscan", "bundled")
        add_films(store, sha, meta, z, scores)
    code = main(["monitor", "--db", db, "--window", "300", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == int(alert) and result["alert"] is alert
    alerts = {c["name"] for c in result["checks"] if c["alert"]}
    assert alerts == ({which} if which == "ood_score" else alerts) and (which is None or which in alerts)
    if alert:
        assert all("adapt --db" in c["action"] for c in result["checks"] if c["alert"])
    with Store.open(db) as store:  # GET /v1/monitor says the same
        app = FastAPI()
        app.state.store = store
        app.include_router(pilot_routes([], None, keyed=False))
        body = TestClient(app).get("/v1/monitor", params={"window": 300}).json()
    assert body["alert"] is alert and {c["name"] for c in body["checks"] if c["alert"]} == alerts


@pytest.mark.slow
def test_site_report_gallery_of_disagreements(tmp_path, trained_model):
    """Films still in the spool get a Grad-CAM card in report.html when AI and reader disagree."""
    from pneumoscan.commands import pilot

    sha = file_sha256(trained_model)
    films = sorted(Path("examples/chest_xray_sample/test/NORMAL").glob("*.jpeg"))[:3]
    db = f"sqlite:///{tmp_path / 'g.db'}"
    with Store.open(db) as store:
        store.register_model(sha, "tiny", "1")
        for i, path in enumerate(films):
            film = store.upsert_film(FilmHeader(study_instance_uid=f"1.9.{i}", sop_instance_uid=f"1.9.{i}.1",
                                                patient_id=f"G{i}"), str(path.resolve())).film
            store.record_result(film.id, sha, probability=0.9, label="PNEUMONIA", threshold=0.5)
            store.add_read(film.study_id, "NORMAL", "dr g")
    report = pilot.site_report(db, tmp_path / "site", trained_model, n_resamples=50)
    assert len(report["disagreements"]) == 3
    page = (tmp_path / "site" / "report.html").read_text()
    assert page.count('alt="Grad-CAM"') == 3 and "AI PNEUMONIA, read NORMAL" in page
