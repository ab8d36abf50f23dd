"""What the store takes and gives back: frozen dataclasses, never ORM objects or dicts.

Callers (node, serve, site report) must not hold database sessions, so every read copies the
rows into these plain values; they stay valid after the session is gone and can be sent as JSON
(``dataclasses.asdict``). Times are timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

# film and study states (a study's state is derived from its films', see Store._refresh_study)
RECEIVED, CLAIMED, SCORED, NOT_SCORED, FAILED = "received", "claimed", "scored", "not_scored", "failed"
FILM_STATES = (RECEIVED, CLAIMED, SCORED, NOT_SCORED, FAILED)
SCORING = "scoring"  # a study with claimed films and none still waiting
STUDY_STATES = (RECEIVED, SCORING, SCORED, NOT_SCORED, FAILED)

LABELS = ("NORMAL", "PNEUMONIA", "UNSURE", "NOT_ASSESSED")  # what the model says (safety.decision)
READ_LABELS = ("NORMAL", "PNEUMONIA", "NOT_ASSESSABLE")  # what a radiologist says

CSTORE, STOW = "cstore", "stow"
DELIVERY_KINDS = (CSTORE, STOW)
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
DELIVERY_STATES = (PENDING, DELIVERED, DEAD)


@dataclass(frozen=True)
class FilmHeader:
    """The DICOM attributes of a received instance that the store keeps (the node reads them)."""

    study_instance_uid: str
    sop_instance_uid: str
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: date | None = None


@dataclass(frozen=True)
class ModelVersion:
    id: int
    sha256: str
    name: str
    version: str
    created_at: datetime
    parent_sha256: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Flag:
    code: str  # e.g. LOW_QUALITY, OUT_OF_DISTRIBUTION, NOT_CHEST (safety.decision.FLAGS)
    detail: str = ""  # the sentence a reader is shown


@dataclass(frozen=True)
class Delivery:
    id: int
    result_id: int
    destination: str  # "AE@host:port" or a STOW URL
    kind: str  # cstore | stow
    state: str  # pending | delivered | dead
    attempts: int
    last_error: str | None
    updated_at: datetime


@dataclass(frozen=True)
class Result:
    id: int
    film_id: int
    model: ModelVersion
    probability: float
    label: str
    threshold: float
    flags: tuple[Flag, ...]
    ood_score: float | None
    scored_at: datetime
    duration_ms: float | None
    sr_sop_instance_uid: str | None
    sc_sop_instance_uid: str | None
    deliveries: tuple[Delivery, ...] = ()

    @property
    def needs_human(self) -> bool:
        """Flagged or not assessed: the page's "Needs a human" group (UNSURE has its own)."""
        return bool(self.flags) or self.label == "NOT_ASSESSED"


@dataclass(frozen=True)
class Film:
    id: int
    study_id: int
    sop_instance_uid: str
    series_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    view_position: str | None
    body_part: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    spool_path: str | None
    received_at: datetime
    state: str
    not_scored_reason: str | None
    claimed_by: str | None
    claimed_at: datetime | None
    results: tuple[Result, ...] = ()  # filled by Store.study, empty elsewhere


@dataclass(frozen=True)
class Upserted:
    film: Film
    created: bool  # False when the instance was already known (a re-sent film)


@dataclass(frozen=True)
class Read:
    id: int
    study_id: int
    film_id: int | None
    label: str  # NORMAL | PNEUMONIA | NOT_ASSESSABLE
    comment: str | None
    reader: str
    created_at: datetime
    superseded_by: int | None

    @property
    def current(self) -> bool:
        return self.superseded_by is None


@dataclass(frozen=True)
class StudySummary:
    """One worklist row. ``probability``/``label`` are those of the study's most suspicious film."""

    id: int
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: date | None
    state: str
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    scored_at: datetime | None
    shadow: bool
    n_films: int
    probability: float | None
    label: str | None
    needs_human: bool
    read_label: str | None  # the current study-level read, if any


@dataclass(frozen=True)
class StudyDetail:
    summary: StudySummary
    films: tuple[Film, ...] = ()
    reads: tuple[Read, ...] = field(default=())  # the whole history, oldest first


@dataclass(frozen=True)
class SettingChange:
    key: str
    value: str
    changed_at: datetime
    changed_by: str | None
