"""The result store: every study, film, decision, delivery, read and setting, in one database.

``Store.open(url)`` connects (SQLite file by default, PostgreSQL to share one worklist between
processes and machines) and migrates to the newest schema. Each method is one transaction and
returns frozen records (records.py). Writes are idempotent where a network can repeat them: a
film received twice is one row, a result per (film, model) and a delivery per (result,
destination, kind) are updated in place. ``claim_films`` hands each film to exactly one worker
(PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: one ``BEGIN IMMEDIATE`` write transaction).

Nothing here logs patient identifiers or DICOM values; errors name the database without password.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from pneumoscan.store import convert, migrate, queries
from pneumoscan.store.records import (CLAIMED, DELIVERED, DELIVERY_KINDS, DELIVERY_STATES, FAILED, LABELS,
                                      NOT_SCORED, PENDING, READ_LABELS, RECEIVED, SCORED, Delivery, Film,
                                      FilmHeader, Flag, ModelVersion, Read, Result, SettingChange, StudyDetail,
                                      StudySummary, Upserted)
from pneumoscan.store.schema import (DeliveryRow, FilmRow, ModelVersionRow, ReadRow, ResultRow, SettingRow,
                                     StudyRow, utcnow)

T = TypeVar("T")
DEFAULT_URL = "sqlite:///pneumoscan.db"
SHADOW_MODE = "shadow_mode"  # settings key: "on" stores results without sending or showing them
RETRY_SQLSTATES = ("40P01", "40001")  # PostgreSQL: deadlock detected, serialisation failure


class Store:
    def __init__(self, engine: Engine, url: URL) -> None:
        self._engine = engine
        self.url = url

    @classmethod
    def open(cls, url: str = DEFAULT_URL) -> Store:
        """Connect and upgrade the schema to head (a no-op when current)."""
        parsed = migrate.normalise_url(url)
        engine = migrate.make_engine(parsed)
        migrate.upgrade(engine, parsed)
        return cls(engine, parsed)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def shown_url(self) -> str:
        return migrate.shown(self.url)

    # -- transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool) -> Iterator[Session]:
        with self._engine.connect().execution_options(sqlite_immediate=write) as conn:
            with Session(conn, expire_on_commit=False) as s, s.begin():
                yield s

    def _write(self, fn: Callable[[Session], T], retries: int = 5) -> T:
        """Run ``fn`` in a write transaction. A unique-key race with another process is retried (the
        next try finds the row the other inserted), and so is a PostgreSQL deadlock or
        serialisation failure; any other database failure is a readable StoreError."""
        for attempt in range(retries):
            try:
                with self._tx(write=True) as s:
                    return fn(s)
            except (IntegrityError, OperationalError) as exc:
                transient = isinstance(exc, IntegrityError) or _sqlstate(exc) in RETRY_SQLSTATES
                if not transient or attempt == retries - 1:
                    raise self._failure(exc) from None
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Session], T]) -> T:
        try:
            with self._tx(write=False) as s:
                return fn(s)
        except OperationalError as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: Exception) -> Exception:
        if isinstance(exc, IntegrityError):
            return exc  # a bug, not the site's database: keep the type for the traceback
        return migrate.StoreError(f"the store at {self.shown_url} failed: {migrate._reason(exc)}")

    # -- model versions ---------------------------------------------------------------------
    def register_model(self, sha256: str, name: str, version: str, *, parent_sha256: str | None = None,
                       note: str | None = None) -> ModelVersion:
        """The model version with this sha256, created if new (name/version of a known one are kept)."""

        def run(s: Session) -> ModelVersion:
            row = s.scalar(select(ModelVersionRow).where(ModelVersionRow.sha256 == sha256))
            if row is None:
                row = ModelVersionRow(sha256=sha256, name=name, version=version, created_at=utcnow(),
                                      parent_sha256=parent_sha256, note=note)
                s.add(row)
                s.flush()
            return convert.model_version(row)

        return self._write(run)

    def model_versions(self) -> list[ModelVersion]:
        return self._read(lambda s: [convert.model_version(r) for r in
                                     s.scalars(select(ModelVersionRow).order_by(ModelVersionRow.id))])

    # -- films and claims -------------------------------------------------------------------
    def upsert_film(self, header: FilmHeader, spool_path: str | None, *, received_at: datetime | None = None,
                    shadow: bool = False) -> Upserted:
        """Record a received instance. A known SOP Instance UID keeps its row and state (its spool
        path is updated); a new film reopens its study (state back to received) so it is scored."""
        now = received_at or utcnow()

        def run(s: Session) -> Upserted:
            # an existing film is locked before its study, in the order claims lock them (no deadlock)
            row = s.scalar(select(FilmRow).where(FilmRow.sop_instance_uid == header.sop_instance_uid)
                           .with_for_update())
            created = row is None
            if row is not None and spool_path is not None:
                row.spool_path = spool_path
                s.flush()
            study = queries.study_for_film(s, header, now, shadow)
            if row is None:
                row = FilmRow(study_id=study.id, received_at=now, state=RECEIVED, spool_path=spool_path,
                              **queries.film_fields(header))
                s.add(row)
                study.stable_at = None
            s.flush()
            queries.refresh_study(s, study)
            return Upserted(film=convert.film(row), created=created)

        return self._write(run)

    def claim_films(self, worker_id: str, limit: int = 16, *, quiet_seconds: float = 0.0,
                    reclaim_after_s: float | None = None, now: datetime | None = None) -> list[Film]:
        """Hand up to ``limit`` waiting films to ``worker_id``; no other worker gets them.

        Only films of studies that received nothing for ``quiet_seconds`` (stable studies) are
        handed out. A claim older than ``reclaim_after_s`` (a worker that died) may be taken over.
        """
        now = now or utcnow()
        waiting = FilmRow.state == RECEIVED
        if reclaim_after_s is not None:
            stale = and_(FilmRow.state == CLAIMED, FilmRow.claimed_at < now - timedelta(seconds=reclaim_after_s))
            waiting = or_(waiting, stale)

        def run(s: Session) -> list[Film]:
            candidates = (select(FilmRow.id).join(StudyRow, FilmRow.study_id == StudyRow.id)
                          .where(waiting, StudyRow.last_received_at <= now - timedelta(seconds=quiet_seconds))
                          .order_by(FilmRow.id).limit(limit).with_for_update(skip_locked=True, of=FilmRow))
            claimed = list(s.scalars(update(FilmRow).where(FilmRow.id.in_(candidates), waiting)
                                     .values(state=CLAIMED, claimed_by=worker_id, claimed_at=now)
                                     .returning(FilmRow.id).execution_options(synchronize_session=False)))
            rows = list(s.scalars(select(FilmRow).where(FilmRow.id.in_(claimed)).order_by(FilmRow.id)))
            for study in s.scalars(select(StudyRow).where(StudyRow.id.in_({r.study_id for r in rows}))):
                study.stable_at = study.stable_at or now
                queries.refresh_study(s, study)
            return [convert.film(r) for r in rows]

        return self._write(run)

    def release_claims(self, worker_id: str) -> int:
        """Give a worker's unfinished films back (a node restarting under the same id calls this)."""

        def run(s: Session) -> int:
            rows = list(s.scalars(select(FilmRow).where(FilmRow.state == CLAIMED, FilmRow.claimed_by == worker_id)))
            for row in rows:
                row.state, row.claimed_by, row.claimed_at = RECEIVED, None, None
            _refresh(s, {r.study_id for r in rows})
            return len(rows)

        return self._write(run)

    def mark_not_scored(self, film_id: int, reason: str) -> Film:
        """A film the selection rules leave out (lateral, CT, multi-frame, ...), with the reason."""
        return self._set_film_state(film_id, NOT_SCORED, reason)

    def mark_failed(self, film_id: int, reason: str) -> Film:
        """A film that could not be scored (unreadable, decoding error), with the reason."""
        return self._set_film_state(film_id, FAILED, reason)

    def _set_film_state(self, film_id: int, state: str, reason: str) -> Film:
        def run(s: Session) -> Film:
            row = _get(s, FilmRow, film_id)
            row.state, row.not_scored_reason = state, reason
            s.flush()
            _refresh(s, {row.study_id})
            return convert.film(row)

        return self._write(run)

    def film(self, film_id: int) -> Film | None:
        return self._read(lambda s: (lambda r: convert.film(r) if r else None)(s.get(FilmRow, film_id)))

    # -- results and deliveries -------------------------------------------------------------
    def record_result(self, film_id: int, model_sha256: str, *, probability: float, label: str, threshold: float,
                      flags: Sequence[Flag] = (), ood_score: float | None = None, duration_ms: float | None = None,
                      sr_sop_instance_uid: str | None = None, sc_sop_instance_uid: str | None = None,
                      scored_at: datetime | None = None) -> Result:
        """The model's answer for a film (one row per film and model version; a repeat updates it)."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        if not math.isfinite(probability):
            raise ValueError("probability must be finite")
        values = dict(probability=float(probability), label=label, threshold=float(threshold),
                      flags=convert.flags_to_json(flags), ood_score=ood_score, duration_ms=duration_ms,
                      sr_sop_instance_uid=sr_sop_instance_uid, sc_sop_instance_uid=sc_sop_instance_uid,
                      scored_at=scored_at or utcnow())

        def run(s: Session) -> Result:
            film = _get(s, FilmRow, film_id)
            model = s.scalar(select(ModelVersionRow).where(ModelVersionRow.sha256 == model_sha256))
            if model is None:
                raise KeyError(f"model {model_sha256[:12]} is not registered: call register_model first")
            row = s.scalar(select(ResultRow).where(ResultRow.film_id == film_id,
                                                   ResultRow.model_version_id == model.id))
            if row is None:
                row = ResultRow(film_id=film_id, model_version_id=model.id, **values)
                s.add(row)
            else:
                for key, value in values.items():
                    setattr(row, key, value)
            film.state, film.not_scored_reason = SCORED, None
            s.flush()
            _refresh(s, {film.study_id})
            return convert.result(row, model)

        return self._write(run)

    def record_delivery(self, result_id: int, destination: str, kind: str, *, state: str,
                        error: str | None = None, attempted: bool = True) -> Delivery:
        """One delivery attempt's outcome (or, with ``attempted=False``, a delivery to make).
        A delivered result stays delivered: a late failure report cannot undo it."""
        if kind not in DELIVERY_KINDS or state not in DELIVERY_STATES:
            raise ValueError(f"kind must be one of {DELIVERY_KINDS} and state one of {DELIVERY_STATES}")

        def run(s: Session) -> Delivery:
            _get(s, ResultRow, result_id)
            row = s.scalar(select(DeliveryRow).where(DeliveryRow.result_id == result_id,
                                                     DeliveryRow.destination == destination, DeliveryRow.kind == kind))
            if row is None:
                row = DeliveryRow(result_id=result_id, destination=destination, kind=kind, state=state, attempts=0)
                s.add(row)
            if row.state != DELIVERED:
                row.state = state
                row.last_error = error if state != DELIVERED else None
            row.attempts = (row.attempts or 0) + int(attempted)
            row.updated_at = utcnow()
            s.flush()
            return convert.delivery(row)

        return self._write(run)

    def pending_deliveries(self, states: Sequence[str] = (PENDING,), *, kind: str | None = None,
                           limit: int = 100) -> list[Delivery]:
        """Deliveries still to make, oldest first (``states=(DEAD,)`` lists the dead letters)."""

        def run(s: Session) -> list[Delivery]:
            query = select(DeliveryRow).where(DeliveryRow.state.in_(states))
            if kind is not None:
                query = query.where(DeliveryRow.kind == kind)
            rows = s.scalars(query.order_by(DeliveryRow.updated_at, DeliveryRow.id).limit(limit))
            return [convert.delivery(r) for r in rows]

        return self._read(run)

    def result(self, result_id: int) -> Result | None:
        def run(s: Session) -> Result | None:
            row = s.get(ResultRow, result_id)
            return convert.result(row, s.get_one(ModelVersionRow, row.model_version_id)) if row else None

        return self._read(run)

    # -- the worklist ----------------------------------------------------------------------
    def list_studies(self, state: str | None = None, since: datetime | None = None, until: datetime | None = None,
                     limit: int = 50, offset: int = 0, *, needs_human: bool | None = None,
                     by_arrival: bool = False) -> list[StudySummary]:
        """Studies most suspicious first (highest assessed probability; unscored ones last), or newest
        first ``by_arrival`` (shadow mode: the order must not tell the AI's answer).
        ``since``/``until`` bound the first reception time: since <= t < until."""
        return self._read(lambda s: queries.list_studies(s, state=state, since=since, until=until,
                                                         needs_human=needs_human, limit=limit, offset=offset,
                                                         by_arrival=by_arrival))

    def count_studies(self, state: str | None = None, since: datetime | None = None, until: datetime | None = None,
                      *, needs_human: bool | None = None) -> int:
        return self._read(lambda s: queries.count_studies(s, state=state, since=since, until=until,
                                                          needs_human=needs_human))

    def study(self, study_id: int) -> StudyDetail | None:
        return self._read(lambda s: (lambda r: queries.study_detail(s, r) if r else None)(s.get(StudyRow, study_id)))

    def study_by_uid(self, study_instance_uid: str) -> StudyDetail | None:
        def run(s: Session) -> StudyDetail | None:
            row = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_instance_uid))
            return queries.study_detail(s, row) if row else None

        return self._read(run)

    # -- radiologists' reads ---------------------------------------------------------------
    def add_read(self, study_id: int, label: str, reader: str, *, comment: str | None = None,
                 film_id: int | None = None, created_at: datetime | None = None) -> Read:
        """A radiologist's read. It supersedes the current read of the same study (and film): a
        correction is a new row, the old one keeps its text and points to its successor."""
        if label not in READ_LABELS:
            raise ValueError(f"label must be one of {READ_LABELS}, not {label!r}")

        def run(s: Session) -> Read:
            _get(s, StudyRow, study_id)
            if film_id is not None and _get(s, FilmRow, film_id).study_id != study_id:
                raise KeyError(f"film {film_id} is not in study {study_id}")
            row = ReadRow(study_id=study_id, film_id=film_id, label=label, comment=comment, reader=reader,
                          created_at=created_at or utcnow())
            s.add(row)
            s.flush()
            film_match = ReadRow.film_id.is_(None) if film_id is None else ReadRow.film_id == film_id
            for old in s.scalars(select(ReadRow).where(ReadRow.study_id == study_id, film_match,
                                                       ReadRow.superseded_by.is_(None), ReadRow.id != row.id)):
                old.superseded_by = row.id
            return convert.read(row)

        return self._write(run)

    def read_history(self, study_id: int) -> list[Read]:
        """Every read of a study, superseded ones included, oldest first."""
        return self._read(lambda s: queries.read_history(s, study_id))

    # -- settings --------------------------------------------------------------------------
    def set_setting(self, key: str, value: str, changed_by: str | None = None) -> SettingChange:
        """Change a setting; every change is a new row of the settings log."""

        def run(s: Session) -> SettingChange:
            row = SettingRow(key=key, value=str(value), changed_at=utcnow(), changed_by=changed_by)
            s.add(row)
            s.flush()
            return convert.setting(row)

        return self._write(run)

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self._read(lambda s: s.scalar(select(SettingRow).where(SettingRow.key == key)
                                            .order_by(SettingRow.id.desc()).limit(1)))
        return row.value if row is not None else default

    def settings_log(self, key: str | None = None) -> list[SettingChange]:
        def run(s: Session) -> list[SettingChange]:
            query = select(SettingRow) if key is None else select(SettingRow).where(SettingRow.key == key)
            return [convert.setting(r) for r in s.scalars(query.order_by(SettingRow.id))]

        return self._read(run)


def _sqlstate(exc: Exception) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


def _get(s: Session, table: type[T], key: int) -> T:
    row = s.get(table, key)
    if row is None:
        raise KeyError(f"no {getattr(table, '__tablename__', 'row')} with id {key}")
    return row


def _refresh(s: Session, study_ids: set[int]) -> None:
    for study in s.scalars(select(StudyRow).where(StudyRow.id.in_(study_ids))):
        queries.refresh_study(s, study)


__all__ = ["Store", "DEFAULT_URL", "SHADOW_MODE"]
