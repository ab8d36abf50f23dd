"""The result store on SQLite: migrations, idempotent writes, claims, the worklist, reads, settings."""

from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from store_worker import run_two_claimers

from pneumoscan.store import (CLAIMED, NOT_SCORED, RECEIVED, SCORED, SCORING, FilmHeader, Flag, Store, StoreError,
                              normalise_url)
from pneumoscan.store import migrate
from pneumoscan.store.schema import Base

SHA = "ab" * 32
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def header(study: int, film: int, **extra) -> FilmHeader:
    return FilmHeader(study_instance_uid=f"1.2.3.{study}", sop_instance_uid=f"1.2.3.{study}.{film}", **extra)


@pytest.fixture
def store(tmp_path):
    with Store.open(str(tmp_path / "store.db")) as s:
        s.register_model(SHA, "bundled", "1.0")
        yield s


def scored(store: Store, study: int, film: int, probability: float, label: str, flags=(), at=T0) -> int:
    f = store.upsert_film(header(study, film), None, received_at=at).film
    store.record_result(f.id, SHA, probability=probability, label=label, threshold=0.5, flags=flags)
    return f.study_id


def test_opening_an_empty_file_migrates_it_to_head_and_the_models_agree(tmp_path):
    path = tmp_path / "new" / "pneumoscan.db"
    with Store.open(f"sqlite:///{path}") as store:
        assert migrate.current(store._engine) == migrate.head()
        with store._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"model_versions", "studies", "films", "results", "deliveries", "reads", "settings_log"} <= tables
    Store.open(str(path)).close()  # reopening an up-to-date database changes nothing


def test_a_schema_newer_than_the_code_is_refused_readably(tmp_path):
    path = tmp_path / "s.db"
    Store.open(str(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(StoreError, match="newer than this pneumoscan knows"):
        Store.open(str(path))


def test_urls_are_normalised_and_passwords_never_shown():
    assert normalise_url("postgresql://u:secret@db/x").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@db/x").drivername == "postgresql+psycopg"
    assert normalise_url("some/file.db").drivername == "sqlite"
    assert "secret" not in migrate.shown(normalise_url("postgresql://u:secret@db/x"))
    with pytest.raises(StoreError, match="unsupported database"):
        normalise_url("mysql://u@db/x")
    with pytest.raises(StoreError, match="cannot open the store") as err:
        Store.open("postgresql://u:secret@127.0.0.1:1/x")  # nothing listens on port 1
    assert "secret" not in str(err.value)


def test_a_film_received_twice_is_one_row(store):
    first = store.upsert_film(header(1, 1, patient_name="Doe^Jane", accession_number="A1",
                                     study_date=date(2026, 2, 1)), "/spool/1", received_at=T0)
    again = store.upsert_film(header(1, 1), "/spool/1-again", received_at=T0 + timedelta(seconds=5))
    assert first.created and not again.created and again.film.id == first.film.id
    detail = store.study(first.film.study_id)
    assert detail is not None and len(detail.films) == 1 and detail.films[0].spool_path == "/spool/1-again"
    assert detail.summary.patient_name == "Doe^Jane" and detail.summary.accession_number == "A1"
    assert detail.summary.last_received_at == T0 + timedelta(seconds=5)
    assert detail.summary.first_received_at.tzinfo is not None
    assert store.count_studies() == 1
    assert store.register_model(SHA, "other name", "9").version == "1.0"  # known sha: kept as registered


def test_results_and_deliveries_are_one_row_per_key(store):
    film = store.upsert_film(header(1, 1), None).film
    r1 = store.record_result(film.id, SHA, probability=0.7, label="PNEUMONIA", threshold=0.5)
    r2 = store.record_result(film.id, SHA, probability=0.7, label="PNEUMONIA", threshold=0.5,
                             sr_sop_instance_uid="2.25.1")
    assert r1.id == r2.id and r2.sr_sop_instance_uid == "2.25.1"
    store.record_delivery(r1.id, "PACS@127.0.0.1:104", "cstore", state="pending", attempted=False)
    store.record_delivery(r1.id, "PACS@127.0.0.1:104", "cstore", state="pending", error="refused")
    assert [d.attempts for d in store.pending_deliveries()] == [1]
    done = store.record_delivery(r1.id, "PACS@127.0.0.1:104", "cstore", state="delivered")
    late = store.record_delivery(r1.id, "PACS@127.0.0.1:104", "cstore", state="dead", error="late report")
    assert done.id == late.id and late.state == "delivered" and late.attempts == 3
    assert store.pending_deliveries() == [] and store.pending_deliveries(states=("dead",)) == []
    store.record_delivery(r1.id, "http://pacs/dicomweb", "stow", state="dead", error="HTTP 503")
    assert [d.kind for d in store.pending_deliveries(states=("dead",))] == ["stow"]
    assert len(store.study(film.study_id).films[0].results[0].deliveries) == 2
    with pytest.raises(KeyError, match="not registered"):
        store.record_result(film.id, "cd" * 32, probability=0.1, label="NORMAL", threshold=0.5)
    with pytest.raises(ValueError):
        store.record_result(film.id, SHA, probability=0.1, label="MAYBE", threshold=0.5)


def test_claims_wait_for_a_quiet_study_and_go_to_one_worker(store):
    for film in (1, 2):
        store.upsert_film(header(1, film), None, received_at=T0)
    store.upsert_film(header(2, 1), None, received_at=T0 + timedelta(seconds=8))
    now = T0 + timedelta(seconds=10)
    first = store.claim_films("node-a", limit=10, quiet_seconds=5, now=now)
    assert [f.sop_instance_uid for f in first] == ["1.2.3.1.1", "1.2.3.1.2"]  # study 2 is still arriving
    assert {f.state for f in first} == {CLAIMED} and {f.claimed_by for f in first} == {"node-a"}
    assert store.claim_films("node-b", limit=10, quiet_seconds=5, now=now) == []
    study = store.study(first[0].study_id).summary
    assert study.state == SCORING and study.stable_at == now
    later = T0 + timedelta(seconds=20)
    assert [f.sop_instance_uid for f in store.claim_films("node-b", quiet_seconds=5, now=later)] == ["1.2.3.2.1"]
    # a dead worker's claims: taken over after reclaim_after_s, or given back on its restart
    assert store.claim_films("node-c", now=later, reclaim_after_s=60) == []
    taken = store.claim_films("node-c", now=later + timedelta(seconds=61), reclaim_after_s=60)
    assert {f.claimed_by for f in taken} == {"node-c"} and len(taken) == 3
    assert store.release_claims("node-c") == 3
    assert {f.state for f in store.study(first[0].study_id).films} == {RECEIVED}


def test_study_state_follows_its_films_and_a_new_film_reopens_it(store):
    a = store.upsert_film(header(1, 1), None).film
    b = store.upsert_film(header(1, 2), None).film
    store.claim_films("w")
    store.record_result(a.id, SHA, probability=0.2, label="NORMAL", threshold=0.5)
    store.mark_not_scored(b.id, "lateral view")
    detail = store.study(a.study_id)
    assert detail.summary.state == SCORED and detail.summary.scored_at is not None
    assert [f.not_scored_reason for f in detail.films] == [None, "lateral view"]
    assert not detail.summary.needs_human
    store.upsert_film(header(1, 3), None)
    assert store.study(a.study_id).summary.state == RECEIVED
    only_lateral = store.upsert_film(header(2, 1), None).film
    store.mark_not_scored(only_lateral.id, "lateral view")
    summary = store.study(only_lateral.study_id).summary
    assert summary.state == NOT_SCORED and summary.needs_human  # no assessed film: a person must look


def test_worklist_is_most_suspicious_first_with_filters_and_paging(store):
    low = scored(store, 1, 1, 0.10, "NORMAL")
    high = scored(store, 2, 1, 0.95, "PNEUMONIA", at=T0 + timedelta(days=1))
    odd = scored(store, 3, 1, 0.60, "PNEUMONIA", flags=[Flag("OUT_OF_DISTRIBUTION", "unusual")])
    unassessed = scored(store, 4, 1, 0.99, "NOT_ASSESSED", flags=[Flag("NOT_CHEST", "not a chest")])
    waiting = store.upsert_film(header(5, 1), None, received_at=T0).film.study_id
    rows = store.list_studies()
    assert [r.id for r in rows] == [high, odd, low, unassessed, waiting]  # NOT_ASSESSED has no rank
    assert [r.needs_human for r in rows] == [False, True, False, True, False]
    assert rows[3].label == "NOT_ASSESSED" and rows[3].probability is None
    assert [r.id for r in store.list_studies(needs_human=True)] == [odd, unassessed]
    assert [r.id for r in store.list_studies(state=RECEIVED)] == [waiting]
    day2 = T0 + timedelta(days=1)
    assert [r.id for r in store.list_studies(since=day2)] == [high]
    assert high not in [r.id for r in store.list_studies(until=day2)]
    assert [r.id for r in store.list_studies(limit=2, offset=1)] == [odd, low]
    assert store.count_studies() == 5 and store.count_studies(state=SCORED) == 4


def test_reads_are_corrected_by_new_rows_and_the_history_is_kept(store):
    study = scored(store, 1, 1, 0.8, "PNEUMONIA")
    film = store.study(study).films[0].id
    first = store.add_read(study, "NORMAL", "dr-a", comment="clear")
    fix = store.add_read(study, "PNEUMONIA", "dr-b", comment="missed the RLL")
    per_film = store.add_read(study, "PNEUMONIA", "dr-b", film_id=film)
    history = store.read_history(study)
    assert [r.id for r in history] == [first.id, fix.id, per_film.id]
    assert history[0].superseded_by == fix.id and history[0].comment == "clear" and not history[0].current
    assert history[1].current and history[2].current  # a film's read does not supersede the study's
    assert store.study(study).summary.read_label == "PNEUMONIA"
    assert store.list_studies()[0].read_label == "PNEUMONIA"
    with pytest.raises(ValueError):
        store.add_read(study, "UNSURE", "dr-a")
    other = store.upsert_film(header(2, 1), None).film
    with pytest.raises(KeyError):
        store.add_read(study, "NORMAL", "dr-a", film_id=other.id)


def test_settings_keep_their_log(store):
    assert store.get_setting("shadow_mode", "off") == "off"
    store.set_setting("shadow_mode", "on", "pilot lead")
    store.set_setting("shadow_mode", "off", "pilot lead")
    assert store.get_setting("shadow_mode") == "off"
    assert [(c.value, c.changed_by) for c in store.settings_log("shadow_mode")] == [("on", "pilot lead"),
                                                                                   ("off", "pilot lead")]


@pytest.mark.slow  # two Python processes and ~250 committed transactions: about 10 s on 2 cores
def test_two_processes_on_one_sqlite_file_never_claim_a_film_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = run_two_claimers(url, tmp_path, n_films=60)
    assert not set(a) & set(b) and sorted(a + b) == list(range(1, 61))
    with Store.open(url) as store:
        films = [f for s in store.list_studies(limit=100) for f in store.study(s.id).films]
    assert len(films) == 60 and all(len(f.results) == 1 and f.state == SCORED for f in films)
