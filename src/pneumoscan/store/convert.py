"""ORM rows to the store's frozen records (records.py), so no session leaks out of the store."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pneumoscan.store.records import Delivery, Film, Flag, ModelVersion, Read, Result, SettingChange, StudySummary
from pneumoscan.store.schema import (DeliveryRow, FilmRow, ModelVersionRow, ReadRow, ResultRow, SettingRow,
                                     StudyRow)


def model_version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(id=row.id, sha256=row.sha256, name=row.name, version=row.version,
                        created_at=row.created_at, parent_sha256=row.parent_sha256, note=row.note)


def flags_to_json(flags: Iterable[Flag]) -> list[dict[str, str]]:
    return [{"code": f.code, "detail": f.detail} for f in flags]


def flags_from_json(data: Sequence[dict[str, str]] | None) -> tuple[Flag, ...]:
    return tuple(Flag(code=str(d.get("code", "")), detail=str(d.get("detail", ""))) for d in data or ())


def delivery(row: DeliveryRow) -> Delivery:
    return Delivery(id=row.id, result_id=row.result_id, destination=row.destination, kind=row.kind,
                    state=row.state, attempts=row.attempts, last_error=row.last_error, updated_at=row.updated_at)


def result(row: ResultRow, model: ModelVersionRow, deliveries: Iterable[DeliveryRow] = ()) -> Result:
    return Result(id=row.id, film_id=row.film_id, model=model_version(model), probability=row.probability,
                  label=row.label, threshold=row.threshold, flags=flags_from_json(row.flags),
                  ood_score=row.ood_score, scored_at=row.scored_at, duration_ms=row.duration_ms,
                  sr_sop_instance_uid=row.sr_sop_instance_uid, sc_sop_instance_uid=row.sc_sop_instance_uid,
                  deliveries=tuple(delivery(d) for d in deliveries))


def film(row: FilmRow, results: Iterable[Result] = ()) -> Film:
    return Film(id=row.id, study_id=row.study_id, sop_instance_uid=row.sop_instance_uid,
                series_instance_uid=row.series_instance_uid, sop_class_uid=row.sop_class_uid,
                modality=row.modality, view_position=row.view_position, body_part=row.body_part,
                manufacturer=row.manufacturer, manufacturer_model=row.manufacturer_model,
                spool_path=row.spool_path, received_at=row.received_at, state=row.state,
                not_scored_reason=row.not_scored_reason, claimed_by=row.claimed_by, claimed_at=row.claimed_at,
                results=tuple(results))


def read(row: ReadRow) -> Read:
    return Read(id=row.id, study_id=row.study_id, film_id=row.film_id, label=row.label, comment=row.comment,
                reader=row.reader, created_at=row.created_at, superseded_by=row.superseded_by)


def study_summary(row: StudyRow, n_films: int, read_label: str | None) -> StudySummary:
    return StudySummary(id=row.id, study_instance_uid=row.study_instance_uid,
                        accession_number=row.accession_number, patient_id=row.patient_id,
                        patient_name=row.patient_name, study_date=row.study_date, state=row.state,
                        first_received_at=row.first_received_at, last_received_at=row.last_received_at,
                        stable_at=row.stable_at, scored_at=row.scored_at, shadow=row.shadow, n_films=n_films,
                        probability=row.max_probability, label=row.top_label, needs_human=row.needs_human,
                        read_label=read_label)


def setting(row: SettingRow) -> SettingChange:
    return SettingChange(key=row.key, value=row.value, changed_at=row.changed_at, changed_by=row.changed_by)
