"""A small worklist in a result store, as the DICOM node would leave it, for the serve tests."""

from __future__ import annotations

from datetime import date, datetime, timezone

from pneumoscan.store import FilmHeader, Flag, Store

SHA = "5e" * 32
T0 = datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)
PATIENTS = {  # study number -> (patient name, accession): must show in responses, never in logs
    1: ("Roe^Richard", "ACC-LOW-1001"), 2: ("Doe^Jane", "ACC-HIGH-2002"),
    3: ("Poe^Edgar", "ACC-ODD-3003"), 4: ("Moe^Lateral", "ACC-LAT-4004"), 5: ("Zoe^Waiting", "ACC-WAIT-5005"),
}


def header(study: int, film: int, **extra) -> FilmHeader:
    name, accession = PATIENTS[study]
    return FilmHeader(study_instance_uid=f"1.2.826.0.1.3680043.9.{study}",
                      sop_instance_uid=f"1.2.826.0.1.3680043.9.{study}.{film}", patient_name=name,
                      patient_id=f"MRN-{study}", accession_number=accession, study_date=date(2026, 3, 2),
                      modality="DX", **extra)


def fill_worklist(store: Store, day: datetime = T0) -> dict[str, int]:
    """Four studies: a low and a high NORMAL/PNEUMONIA, a flagged one and one with only a lateral film."""
    store.register_model(SHA, "densenet121", "0.1.0")
    ids = {}
    for name, study, probability, label, flags in (
            ("low", 1, 0.08, "NORMAL", ()), ("high", 2, 0.93, "PNEUMONIA", ()),
            ("odd", 3, 0.55, "PNEUMONIA", (Flag("out_of_distribution", "unusual for the training films"),))):
        film = store.upsert_film(header(study, 1, view_position="PA"), None, received_at=day).film
        store.record_result(film.id, SHA, probability=probability, label=label, threshold=0.5, flags=flags)
        ids[name] = film.study_id
    lateral = store.upsert_film(header(4, 1, view_position="LL"), None, received_at=day).film
    store.mark_not_scored(lateral.id, "lateral view: the model reads frontal films only")
    ids["lateral"] = lateral.study_id
    return ids
