"""/v1/studies: the result store's worklist over HTTP (filters, paging, detail, API key, privacy)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from store_data import PATIENTS, T0, fill_worklist, header

from pneumoscan.cli import app as cli
from pneumoscan.serve.app import create_app
from pneumoscan.store import Store

KEY = "ward-7-key"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'pneumoscan.db'}"
    with Store.open(url) as store:
        ids = fill_worklist(store)
        late = store.upsert_film(header(5, 1), None, received_at=T0 + timedelta(days=3)).film  # not yet scored
        ids["late"] = late.study_id
        store.add_read(ids["high"], "NORMAL", "dr-a")
        store.add_read(ids["high"], "PNEUMONIA", "dr-a", comment="corrected: RLL opacity")
    return url, ids


@pytest.fixture(scope="module")
def client(trained_model, db):
    with TestClient(create_app(trained_model, api_key=KEY, db=db[0])) as c:  # one event loop for all requests
        yield c


def get(client, path, **params):
    return client.get(path, params=params, headers={"X-API-Key": KEY})


def test_studies_are_listed_most_suspicious_first_with_who_they_are(client, db):
    _, ids = db
    body = get(client, "/v1/studies").json()
    assert [s["id"] for s in body["studies"]] == [ids["high"], ids["odd"], ids["low"], ids["lateral"], ids["late"]]
    assert body["total"] == 5 and body["limit"] == 50 and body["offset"] == 0
    high = body["studies"][0]
    assert (high["patient_name"], high["accession_number"]) == PATIENTS[2]
    assert high["probability"] == pytest.approx(0.93) and high["label"] == "PNEUMONIA"
    assert high["read_label"] == "PNEUMONIA" and not high["needs_human"]
    assert "patient_id" not in high  # what the worklist needs, no more
    assert [s["needs_human"] for s in body["studies"]] == [False, True, False, True, False]


def test_filters_and_paging(client, db):
    _, ids = db
    ids_of = lambda r: [s["id"] for s in r.json()["studies"]]  # noqa: E731
    assert ids_of(get(client, "/v1/studies", state="not_scored")) == [ids["lateral"]]
    assert ids_of(get(client, "/v1/studies", state="received")) == [ids["late"]]
    assert ids_of(get(client, "/v1/studies", needs_human="true")) == [ids["odd"], ids["lateral"]]
    day = T0.date().isoformat()
    assert len(ids_of(get(client, "/v1/studies", since=day, until=day))) == 4  # a date is the whole day
    assert len(ids_of(get(client, "/v1/studies", since="2026-03-03"))) == 1
    assert len(ids_of(get(client, "/v1/studies", until="2026-03-02T09:00:00"))) == 0
    page = get(client, "/v1/studies", limit=2, offset=3).json()
    assert [s["id"] for s in page["studies"]] == [ids["lateral"], ids["late"]] and page["total"] == 5
    for bad in ({"state": "lost"}, {"since": "yesterday"}, {"limit": 0}, {"offset": -1}):
        r = get(client, "/v1/studies", **bad)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", bad


def test_one_study_lists_films_results_flags_and_reads(client, db):
    _, ids = db
    odd = get(client, f"/v1/studies/{ids['odd']}").json()
    (film,) = odd["films"]
    assert "spool_path" not in film and "claimed_by" not in film and "patient_id" not in odd["summary"]
    (result,) = film["results"]
    assert result["flags"] == [{"code": "out_of_distribution", "detail": "unusual for the training films"}]
    assert result["model"]["sha256"] == "5e" * 32 and result["threshold"] == 0.5
    lateral = get(client, f"/v1/studies/{ids['lateral']}").json()
    assert lateral["films"][0]["not_scored_reason"].startswith("lateral view")
    reads = get(client, f"/v1/studies/{ids['high']}").json()["reads"]
    assert [(r["label"], r["superseded_by"] is None) for r in reads] == [("NORMAL", False), ("PNEUMONIA", True)]
    r = get(client, "/v1/studies/999")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_every_study_endpoint_needs_the_key(client, db):
    _, ids = db
    for path in ("/v1/studies", f"/v1/studies/{ids['high']}"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 401
        assert get(client, path).status_code == 200


def test_without_a_store_the_studies_say_how_to_get_one(trained_model):
    c = TestClient(create_app(trained_model, api_key=None))
    r = c.get("/v1/studies")
    assert r.status_code == 404 and "--db" in r.json()["detail"]


def test_patient_names_and_accessions_stay_out_of_the_logs(client, db, caplog):
    _, ids = db
    caplog.set_level(logging.DEBUG)
    get(client, "/v1/studies", since="2026-03-01")
    for study_id in ids.values():
        get(client, f"/v1/studies/{study_id}")
    assert "GET /v1/studies 200" in caplog.text  # the access log works
    for name, accession in PATIENTS.values():
        assert name not in caplog.text and accession not in caplog.text and "MRN-" not in caplog.text


def test_cli_serve_passes_the_store_and_refuses_a_bad_one(trained_model, db, monkeypatch, capsys, tmp_path):
    from pneumoscan.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port, settings: seen.update(app=app))
    assert cli.main(["serve", "--model", str(trained_model), "--db", db[0]]) == 0
    assert seen["app"].state.store is not None
    assert cli.main(["serve", "--model", str(trained_model), "--db", "mysql://u:pw@host/x"]) == 2
    err = capsys.readouterr().err
    assert "unsupported database" in err and "Traceback" not in err and "pw@" not in err


def test_shadow_mode_hides_the_answer_of_unread_studies_and_orders_by_arrival(trained_model, tmp_path):
    """In a silent pilot neither the JSON nor the order of the worklist may tell the AI's answer
    before the radiologist's read is saved; a read study shows it again."""
    url = f"sqlite:///{tmp_path / 'pilot.db'}"
    with Store.open(url) as store:
        ids = fill_worklist(store)
        store.add_read(ids["low"], "NORMAL", "dr-a")
        store.set_setting("shadow_mode", "on", changed_by="pilot lead")
        arrival = [s.id for s in store.list_studies(by_arrival=True)]
    with TestClient(create_app(trained_model, api_key=KEY, db=url)) as c:
        body = get(c, "/v1/studies").json()
        assert [s["id"] for s in body["studies"]] == arrival
        by_id = {s["id"]: s for s in body["studies"]}
        for study_id, row in by_id.items():
            if study_id == ids["low"]:
                assert row["probability"] is not None and row["read_label"] == "NORMAL"
            else:
                assert row["probability"] is None and row["label"] is None and not row["needs_human"]
        hidden = get(c, f"/v1/studies/{ids['high']}").json()
        assert all(f["results"] == [] for f in hidden["films"]) and hidden["summary"]["probability"] is None
        shown = get(c, f"/v1/studies/{ids['low']}").json()
        assert any(f["results"] for f in shown["films"])
        assert get(c, "/v1/studies", needs_human="true").status_code == 422
        assert c.put("/v1/shadow", json={"on": False, "by": "pilot lead"}, headers={"X-API-Key": KEY}).status_code == 200
        assert get(c, "/v1/studies").json()["studies"][0]["id"] == ids["high"]  # most suspicious first again
