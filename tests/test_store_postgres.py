"""The result store on a real PostgreSQL (Debian's, started by the test on a free port in /tmp).

Skipped with the apt line when PostgreSQL is not installed. Marked slow: the server start alone
takes a few seconds.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from store_worker import run_two_claimers

from pneumoscan.store import SCORED, FilmHeader, Store, migrate
from pneumoscan.store.schema import Base

pytestmark = pytest.mark.slow
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def test_an_empty_database_is_migrated_to_head_and_the_models_agree(postgres_url):
    with Store.open(postgres_url) as store:
        assert store.dialect == "postgresql"
        assert migrate.current(store._engine) == migrate.head()
        with store._engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        film = store.upsert_film(FilmHeader("1.2.3", "1.2.3.1"), None, received_at=T0).film
        assert film.received_at == T0  # aware UTC round trip
    Store.open(postgres_url).close()  # a second open finds it current


def test_a_claim_skips_films_another_worker_holds_without_waiting(postgres_url):
    with Store.open(postgres_url) as store:
        ids = [store.upsert_film(FilmHeader("1.2.9", f"1.2.9.{i}"), None).film.id for i in range(4)]
        with psycopg.connect(postgres_url, autocommit=False) as other:  # another worker mid-claim
            other.execute("SELECT id FROM films WHERE id = ANY(%s) FOR UPDATE", (ids[:2],))
            assert [f.id for f in store.claim_films("node-b", limit=10)] == ids[2:]
        assert [f.id for f in store.claim_films("node-b", limit=10)] == ids[:2]  # released: now claimable


@pytest.mark.parametrize("racing", [False, True], ids=["films-waiting", "both-receive-the-same-films"])
def test_two_processes_on_one_database_never_claim_a_film_twice(postgres_url, tmp_path, racing):
    a, b = run_two_claimers(postgres_url, tmp_path, n_films=120, racing=racing)
    with Store.open(postgres_url) as store:
        films = [f for s in store.list_studies(limit=100) for f in store.study(s.id).films]
    assert len(films) == 120  # a film received by both workers is one row
    assert not set(a) & set(b) and sorted(a + b) == sorted(f.id for f in films)  # (ids may skip: sequences)
    assert all(len(f.results) == 1 and f.state == SCORED for f in films)
