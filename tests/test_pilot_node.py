"""Issue 19's whole loop from the DICOM node, with real parts: synthetic films (the sample JPEGs,
labels from their folders) sent with pynetdicom to a node in this process -> SQLite result store
-> radiologists' reads through the REST API -> ``site-report`` with intervals -> ``adapt --db``
with a sensitivity floor (a new registered version) -> a node running that version on the same
store scores the next films, recorded under the new sha256. No metric value of the model is
asserted: counts, versions and parents, intervals around values, and the floor on the fitted films
(which holds by construction, so only a broken loop can fail it)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from dicom_films import chest_film, sample_jpegs, save
from pneumoscan.cli.app import main
from pneumoscan.commands import pilot
from pneumoscan.core import metrics
from pneumoscan.core.files import file_sha256
from pneumoscan.modeling import artifact
from pneumoscan.node.scoring import Scorer
from pneumoscan.serve.app import create_app
from pneumoscan.store import Store
from test_node import make_node, send, until

FLOOR = 0.9
PER_STUDY = 2  # films of one patient per study, all of the same class (one read per study)


def studies(tmp_path, label: str, jpegs, prefix: str) -> dict[str, tuple[str, list[pydicom.Dataset]]]:
    """study UID -> (label, its films as a modality sends them), one patient per study."""
    out = {}
    for k in range(0, len(jpegs), PER_STUDY):
        uid = pydicom.uid.generate_uid()
        films = [pydicom.dcmread(save(chest_film(j, study_uid=uid, identifier=f"{prefix}{label[0]}{k}", instance=i + 1),
                                      tmp_path / "films" / f"{prefix}{label}{k}_{i}.dcm"))
                 for i, j in enumerate(jpegs[k:k + PER_STUDY])]
        out[uid] = (label, films)
    return out


def scored(store: Store, uid: str, n: int, sha: str):
    """The study's films once all ``n`` carry a result of model ``sha`` (else None)."""
    detail = store.study_by_uid(uid)
    if detail is None or len(detail.films) < n:
        return None
    ok = all(any(r.model.sha256 == sha for r in f.results) for f in detail.films)
    return detail if ok else None


def run_node(tmp_path, db: str, scorer: Scorer, batch: dict) -> dict:
    """Send every study of ``batch`` to a node on ``db``; wait until each film has its result."""
    with make_node(tmp_path, scorer, db=db) as node:
        for _, films in batch.values():
            assert send(node.port, *films) == [0x0000] * len(films)
        sha = scorer.engine.sha256
        return {uid: until(lambda u=uid, n=len(films): scored(node.store, u, n, sha), f"study scored by {sha[:12]}")
                for uid, (_, films) in batch.items()}


@pytest.mark.slow
def test_pilot_loop_from_the_dicom_node(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path / "cache"))  # the new version's ONNX export
    db = f"sqlite:///{tmp_path / 'pilot.db'}"
    pneu, normal = sample_jpegs(24, "PNEUMONIA"), sample_jpegs(16, "NORMAL")
    first = studies(tmp_path, "PNEUMONIA", pneu[:20], "A") | studies(tmp_path, "NORMAL", normal[:12], "A")
    n_films = sum(len(f) for _, f in first.values())

    # 1. node -> store: every film scored by the bundled model, under its sha256
    old = Scorer.load(None)
    old_sha = file_sha256(artifact.BUNDLED_MODEL)
    assert old.engine.sha256 == old_sha
    details = run_node(tmp_path / "node1", db, old, first)
    assert sum(len(d.films) for d in details.values()) == n_films == 32

    # 2. reads through the REST API (one wrong, then corrected)
    with TestClient(create_app(None, api_key=None, db=db)) as client:
        uid0 = next(iter(first))
        wrong = "NORMAL" if first[uid0][0] == "PNEUMONIA" else "PNEUMONIA"
        assert client.post(f"/v1/studies/{details[uid0].summary.id}/read",
                           json={"label": wrong, "reader": "dr a"}).status_code == 201
        for uid, (label, _) in first.items():
            r = client.post(f"/v1/studies/{details[uid].summary.id}/read", json={"label": label, "reader": "dr a"})
            assert r.status_code == 201, r.text
        history = client.get(f"/v1/studies/{details[uid0].summary.id}/reads").json()["reads"]
        assert [h["current"] for h in history] == [False, True] and history[1]["label"] == first[uid0][0]

    # 3. site report: n and a 95% CI around every metric, against the readers' labels
    assert main(["site-report", "--db", db, "--out", str(tmp_path / "site"), "--bootstrap", "200"]) == 0
    assert "report.html" in capsys.readouterr().out
    report = json.loads((tmp_path / "site" / "site_report.json").read_text())
    assert report["overall"]["n_read"] == n_films
    for name in ("sensitivity", "specificity", "accuracy"):
        m = report["overall"]["metrics"][name]
        assert m["ci"][0] <= m["value"] <= m["ci"][1], name
    assert (tmp_path / "site" / "report.html").stat().st_size > 10_000

    # 4. adapt --db with the floor: a new version, registered with its parent
    m2 = tmp_path / "m2.pt"
    assert main(["adapt", "--db", db, "--out", str(m2), "--sensitivity-floor", str(FLOOR), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    new_sha = file_sha256(m2)
    assert f"sensitivity floor {FLOOR:g}" in printed and new_sha[:12] in printed and old_sha[:12] in printed
    new = artifact.read_meta(m2)
    assert new_sha != old_sha and new.threshold_rule == f"sensitivity:{FLOOR:g}"
    assert new.prior["recalibrated"]["parent_sha256"] == old_sha
    assert new.prior["recalibrated"]["sensitivity_floor"] == FLOOR
    oof = new.prior["recalibrated"]["out_of_fold"]["sensitivity"]
    assert oof["ci"][0] <= oof["value"] <= oof["ci"][1]
    with Store.open(db) as store:
        versions = {v.sha256: v.parent_sha256 for v in store.model_versions()}
    assert versions[new_sha] == old_sha and versions[old_sha] is None
    # on the fitted films the new cut keeps the floor (as the report states): the stored
    # probabilities' raw logits through the new temperature and threshold
    y, prob = [], []
    for uid, (label, _) in first.items():
        for f in details[uid].films:
            y.append(label == "PNEUMONIA")
            prob.append(next(r.probability for r in f.results if r.model.sha256 == old_sha))
    y = np.array(y)
    p_new = metrics.sigmoid(pilot.raw_logits(artifact.read_meta(artifact.BUNDLED_MODEL), prob) / new.temperature)
    assert np.mean(p_new[y] >= new.threshold) >= FLOOR
    assert np.min(np.abs(p_new - new.threshold)) > 1e-6  # no film sits on the cut (recalibrate.below_the_cut)
    # and so does the new version itself, scoring the fitted films' pixels as its node will
    new_scorer = Scorer.load(str(m2))
    files = [f for uid in first for f in sorted((tmp_path / "films").glob("A*.dcm"))
             if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == uid]
    decoded = new_scorer.decode(files)
    assert not decoded.failed
    verdicts = new_scorer.assess(decoded)
    truth = np.array([first[pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID][0] == "PNEUMONIA"
                      for f in files])
    own = np.array([v.prediction for v in verdicts])
    assert len(files) == n_films and np.mean(own[truth] == 1) >= FLOOR

    # 5. a node with the new version on the same store scores the next films under its sha256
    # (two studies re-take pictures of the first: same pixels, so the new version's probability is
    # the old one's recalibrated by the new temperature)
    nxt = studies(tmp_path, "PNEUMONIA", pneu[20:], "B") | studies(tmp_path, "NORMAL", normal[12:], "B")
    again = studies(tmp_path, "PNEUMONIA", pneu[:PER_STUDY], "C") | studies(tmp_path, "NORMAL", normal[:PER_STUDY], "C")
    later = run_node(tmp_path / "node2", db, new_scorer, nxt | again)
    results = [r for d in later.values() for f in d.films for r in f.results]
    assert len(results) == 12 and {r.model.sha256 for r in results} == {new_sha}
    assert all(r.threshold == pytest.approx(new.threshold) for r in results)
    old_meta = artifact.read_meta(artifact.BUNDLED_MODEL)
    for c, uid in zip(("PNEUMONIA", "NORMAL"), again):
        first_uid = next(u for u in first if first[u][0] == c)  # the study whose pictures were re-sent
        p_old = [next(r.probability for r in f.results if r.model.sha256 == old_sha) for f in details[first_uid].films]
        expected = np.sort(metrics.sigmoid(pilot.raw_logits(old_meta, p_old) / new.temperature))  # monotone: sort both
        p_again = np.sort([f.results[0].probability for f in later[uid].films])
        assert np.allclose(p_again, expected, atol=1e-3), c
    with Store.open(db) as store:  # the first films keep their old-version results only
        assert {r.model.sha256 for uid in first for f in store.study_by_uid(uid).films for r in f.results} == {old_sha}
        assert len(store.model_versions()) == 2
