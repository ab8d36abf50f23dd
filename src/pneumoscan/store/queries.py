"""Queries inside the store's transactions: the worklist, one study in full, read histories; the
study roll-up and the study a received film belongs to.

A study's state and its worklist position (most suspicious film, "needs a human") are derived
from its films and results; ``refresh_study`` recomputes them inside every write that changes a
film, so the worklist sorts and filters on plain columns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pneumoscan.store import convert
from pneumoscan.store.records import (CLAIMED, FAILED, NOT_SCORED, RECEIVED, SCORED, SCORING, FilmHeader, Read,
                                      Result, StudyDetail, StudySummary)
from pneumoscan.store.schema import DeliveryRow, FilmRow, ModelVersionRow, ReadRow, ResultRow, StudyRow



def _study_state(film_states: set[str]) -> str:
    for waiting, state in ((RECEIVED, RECEIVED), (CLAIMED, SCORING), (SCORED, SCORED), (NOT_SCORED, NOT_SCORED)):
        if waiting in film_states:
            return state
    return FAILED if film_states else RECEIVED


def _latest_results(s: Session, film_ids: list[int]) -> dict[int, ResultRow]:
    """Each film's newest result (a recalibrated model's result replaces the old one's in the list)."""
    latest: dict[int, ResultRow] = {}
    rows = s.scalars(select(ResultRow).where(ResultRow.film_id.in_(film_ids)).order_by(ResultRow.scored_at,
                                                                                         ResultRow.id))
    for row in rows:
        latest[row.film_id] = row
    return latest


def refresh_study(s: Session, study: StudyRow) -> None:
    """Recompute a study's state, most suspicious probability and label, and "needs a human"
    (as the page's group: a flagged or NOT_ASSESSED result, a failed film, or no assessed film)."""
    films = list(s.scalars(select(FilmRow).where(FilmRow.study_id == study.id)))
    study.state = _study_state({f.state for f in films})
    latest = list(_latest_results(s, [f.id for f in films]).values())
    assessed = [r for r in latest if r.label != "NOT_ASSESSED" and math.isfinite(r.probability)]
    top = max(assessed, key=lambda r: r.probability, default=None)
    study.max_probability = top.probability if top else None
    study.top_label = top.label if top else (latest[0].label if latest else None)
    final = study.state in (SCORED, NOT_SCORED, FAILED)
    study.needs_human = (any(r.label == "NOT_ASSESSED" or r.flags for r in latest)
                         or any(f.state == FAILED for f in films) or (final and top is None))
    study.scored_at = max((r.scored_at for r in latest), default=None) if final else None


def _filtered(query: Select, state: str | None, since: datetime | None, until: datetime | None,
              needs_human: bool | None) -> Select:
    if state is not None:
        query = query.where(StudyRow.state == state)
    if since is not None:
        query = query.where(StudyRow.first_received_at >= since)
    if until is not None:
        query = query.where(StudyRow.first_received_at < until)
    if needs_human is not None:
        query = query.where(StudyRow.needs_human.is_(needs_human))
    return query


def list_studies(s: Session, *, state: str | None, since: datetime | None, until: datetime | None,
                 needs_human: bool | None, limit: int, offset: int, by_arrival: bool = False) -> list[StudySummary]:
    query = _filtered(select(StudyRow), state, since, until, needs_human)
    arrival = (StudyRow.first_received_at.desc(), StudyRow.id.desc())
    suspicion = (StudyRow.max_probability.desc().nulls_last(), StudyRow.needs_human.desc())
    query = query.order_by(*(arrival if by_arrival else suspicion + arrival)).limit(limit).offset(offset)
    rows = list(s.scalars(query))
    ids = [r.id for r in rows]
    counts = dict(s.execute(select(FilmRow.study_id, func.count()).where(FilmRow.study_id.in_(ids))
                            .group_by(FilmRow.study_id)).tuples().all())
    reads = _current_read_labels(s, ids)
    return [convert.study_summary(r, counts.get(r.id, 0), reads.get(r.id)) for r in rows]


def count_studies(s: Session, *, state: str | None, since: datetime | None, until: datetime | None,
                  needs_human: bool | None) -> int:
    return int(s.scalar(_filtered(select(func.count(StudyRow.id)), state, since, until, needs_human)) or 0)


def _current_read_labels(s: Session, study_ids: list[int]) -> dict[int, str]:
    """Each study's newest current read label (study-level or per film)."""
    rows = s.scalars(select(ReadRow).where(ReadRow.study_id.in_(study_ids), ReadRow.superseded_by.is_(None))
                     .order_by(ReadRow.created_at, ReadRow.id))
    return {r.study_id: r.label for r in rows}


def read_history(s: Session, study_id: int) -> list[Read]:
    rows = s.scalars(select(ReadRow).where(ReadRow.study_id == study_id).order_by(ReadRow.created_at, ReadRow.id))
    return [convert.read(r) for r in rows]


def _results_by_film(s: Session, film_ids: list[int]) -> dict[int, list[Result]]:
    rows = s.execute(select(ResultRow, ModelVersionRow).join(ModelVersionRow)
                     .where(ResultRow.film_id.in_(film_ids)).order_by(ResultRow.scored_at, ResultRow.id)).all()
    deliveries: dict[int, list[DeliveryRow]] = defaultdict(list)
    for d in s.scalars(select(DeliveryRow).where(DeliveryRow.result_id.in_([r.id for r, _ in rows]))
                       .order_by(DeliveryRow.id)):
        deliveries[d.result_id].append(d)
    out: dict[int, list[Result]] = defaultdict(list)
    for row, model in rows:
        out[row.film_id].append(convert.result(row, model, deliveries[row.id]))
    return out


def study_detail(s: Session, row: StudyRow) -> StudyDetail:
    films = list(s.scalars(select(FilmRow).where(FilmRow.study_id == row.id).order_by(FilmRow.id)))
    results = _results_by_film(s, [f.id for f in films])
    history = read_history(s, row.id)
    current = [r for r in history if r.current]
    summary = convert.study_summary(row, len(films), current[-1].label if current else None)
    return StudyDetail(summary=summary, films=tuple(convert.film(f, results.get(f.id, ())) for f in films),
                       reads=tuple(history))


def film_fields(h: FilmHeader) -> dict[str, str | None]:
    return dict(sop_instance_uid=h.sop_instance_uid, series_instance_uid=h.series_instance_uid,
                sop_class_uid=h.sop_class_uid, modality=h.modality, view_position=h.view_position,
                body_part=h.body_part, manufacturer=h.manufacturer, manufacturer_model=h.manufacturer_model)


def study_for_film(s: Session, h: FilmHeader, now: datetime, shadow: bool) -> StudyRow:
    """The study row of a received film, created on its first film; later films fill gaps only."""
    row = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == h.study_instance_uid))
    if row is None:
        row = StudyRow(study_instance_uid=h.study_instance_uid, state=RECEIVED, first_received_at=now,
                       last_received_at=now, shadow=shadow, needs_human=False)
        s.add(row)
    row.last_received_at = max(row.last_received_at, now)
    for attr in ("accession_number", "patient_id", "patient_name", "study_date"):
        if getattr(row, attr) is None and getattr(h, attr) is not None:
            setattr(row, attr, getattr(h, attr))
    s.flush()
    return row
