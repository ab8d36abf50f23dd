"""The silent pilot's commands on the result store: site report, recalibration from reads, drift
monitor, reads import and the shadow-mode switch (docs/pilot.md).

This module only turns store records into the typed rows of ``evaluation.site_report``,
``evaluation.recalibrate`` and ``evaluation.monitor`` and back; the statistics live there. A
film's reference is its current film-level read, else its study's current read. Results are
those of one model version (by sha256; default: the model given, else the bundled one), so a
report never mixes the probabilities of two versions.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from pneumoscan.evaluation import monitor as monitor_mod
from pneumoscan.evaluation import recalibrate as recal
from pneumoscan.evaluation import site_report as site
from pneumoscan.modeling import artifact
from pneumoscan.store import Store
from pneumoscan.store.records import StudyDetail
from pneumoscan.store.store import SHADOW_MODE

log = logging.getLogger(__name__)
PAGE = 500
GALLERY = 24  # disagreements shown with Grad-CAM


def details(store: Store) -> Iterator[StudyDetail]:
    """Every study with its films, results and reads."""
    offset = 0
    while True:
        page = store.list_studies(limit=PAGE, offset=offset)
        for summary in page:
            detail = store.study(summary.id)
            if detail is not None:
                yield detail
        if len(page) < PAGE:
            return
        offset += PAGE


def _current_reads(detail: StudyDetail) -> tuple[str | None, dict[int, str]]:
    current = [r for r in detail.reads if r.current]
    study = next((r.label for r in reversed(current) if r.film_id is None), None)
    return study, {r.film_id: r.label for r in current if r.film_id is not None}


def scored(store: Store, sha256: str, spool: dict | None = None) -> list[tuple[site.SiteFilm, object]]:
    """(SiteFilm, its Result) of every film the model ``sha256`` scored; ``spool`` (if given)
    collects each film's spool path, for the Grad-CAM gallery."""
    out = []
    for detail in details(store):
        study_read, film_reads = _current_reads(detail)
        cluster = detail.summary.patient_id or detail.summary.study_instance_uid
        for film in detail.films:
            result = next((r for r in film.results if r.model.sha256 == sha256), None)
            if result is None:
                continue
            if spool is not None and film.spool_path:
                spool[str(film.id)] = film.spool_path
            reason = ",".join(f.code for f in result.flags) if result.label == "NOT_ASSESSED" else None
            device = " ".join(x for x in (film.manufacturer, film.manufacturer_model) if x)
            out.append((site.SiteFilm(film=str(film.id), cluster=cluster, probability=result.probability,
                                      threshold=result.threshold, label=result.label,
                                      read=film_reads.get(film.id, study_read), reason=reason,
                                      when=film.received_at, device=device, model_version=sha256[:12]), result))
    return out


def _model(model) -> tuple[Path, str, artifact.ModelMeta]:
    path = artifact.resolve(model)
    if path.suffix.lower() != ".pt":
        raise UserError(f"{path}: give the model.pt whose results are in the store")
    return path, file_sha256(path), artifact.read_meta(path)


def site_report(db: str, out: str | Path, model=None, n_resamples: int = 1000) -> dict:
    """``pneumoscan site-report``: writes ``out``/report.html, site_report.json and .md."""
    path, sha, _ = _model(model)
    spool: dict[str, str] = {}
    with Store.open(db) as store:
        films = [f for f, _ in scored(store, sha, spool)]
    if not films:
        raise UserError(f"the store has no results of model {sha[:12]}: score films with it first (or give --model)")
    report = site.site_report(films, n_resamples=n_resamples)
    gallery = disagreement_gallery(path, films, report["disagreements"], spool, Path(out) / "gallery")
    site.write(report, films, out, f"result store, model {sha[:12]}", gallery)
    return report


def disagreement_gallery(model_path: Path, films, disagreements: list[str], spool: dict[str, str], out: Path,
                         limit: int = GALLERY) -> list[tuple[str, str]]:
    """Grad-CAM overlays of the first ``limit`` disagreements whose films are still in the spool:
    (caption, png). Films no longer reachable are left out (the report says how many are shown)."""
    from pneumoscan.evaluation import explain

    by_id = {f.film: f for f in films}
    reachable = [(fid, Path(spool[fid])) for fid in disagreements if fid in spool and Path(spool[fid]).is_file()]
    reachable = reachable[:limit]
    if not reachable:
        return []
    explain.explain_files(model_path, [p for _, p in reachable], out)
    with open(out / "explanations.csv", newline="") as f:
        png_of = {row[0]: row[1] for row in list(csv.reader(f))[1:]}
    return [(f"film {fid}: AI {by_id[fid].label}, read {by_id[fid].read}", str(out / png_of[str(p)]))
            for fid, p in reachable if str(p) in png_of]


def raw_logits(meta: artifact.ModelMeta, prob) -> np.ndarray:
    """The pre-temperature logits behind stored probabilities (the model's offset and temperature undone)."""
    return (np.clip(metrics.logit(np.clip(prob, 1e-12, 1 - 1e-12)), -50, 50) - meta.logit_offset) * meta.temperature


def adapt_from_reads(db: str, out: str | Path, model=None, *, floor: float = recal.DEFAULT_FLOOR,
                     n_resamples: int = 1000) -> dict:
    """``pneumoscan adapt --db``: recalibrate on the read films, write and register the new version."""
    path, sha, meta = _model(model)
    with Store.open(db) as store:
        films = [f for f, _ in scored(store, sha) if f.label != "NOT_ASSESSED" and f.read in (site.NORMAL,
                                                                                               site.PNEUMONIA)]
        if len(films) < 20:
            raise UserError(f"{len(films)} read films scored by model {sha[:12]}: recalibration needs reads of at "
                            "least 20 (better 100 or more); collect reads first")
        y = np.array([f.read == site.PNEUMONIA for f in films], int)
        confidence = (meta.unsure or {}).get("confidence")
        result = recal.recalibrate(raw_logits(meta, [f.probability for f in films]), y, [f.cluster for f in films],
                                   floor=floor, confidence=confidence, n_resamples=n_resamples,
                                   dtype=recal.temperature_dtype(path))
        new_sha = recal.save_model(path, out, result, f"site reads ({len(films)} films)")
        version = store.register_model(new_sha, "pneumoscan", f"recalibrated-{new_sha[:8]}", parent_sha256=sha,
                                       note=f"recalibrated on {len(films)} read films, sensitivity floor {floor:g}")
    return result | {"sha256": new_sha, "parent_sha256": sha, "version": version.version, "out": str(out)}


def monitor(db: "str | Store", model=None, window: int = 200) -> dict:
    """``pneumoscan monitor`` and ``GET /v1/monitor``: the last ``window`` films the model scored
    (``db`` a URL, or the service's open store)."""
    _, sha, meta = _model(model)
    if isinstance(db, Store):
        rows = sorted((r for _, r in scored(db, sha)), key=lambda r: r.scored_at)[-window:]
    else:
        with Store.open(db) as store:
            rows = sorted((r for _, r in scored(store, sha)), key=lambda r: r.scored_at)[-window:]
    if not rows:
        raise UserError(f"the store has no results of model {sha[:12]} to monitor")
    films = [monitor_mod.WindowFilm(logit=float(raw_logits(meta, [r.probability])[0] / meta.temperature),
                                    label=r.label, ood_score=r.ood_score) for r in rows]
    return monitor_mod.monitor(meta, films) | {"model": sha[:12], "window": window}


def import_reads(db: str, csv_path: str | Path, reader: str) -> dict:
    """``pneumoscan reads import``: a CSV with ``accession`` or ``sop_instance_uid``, ``label`` and
    optionally ``comment``/``reader``; each row becomes a read (correcting any earlier one)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "label" not in rows[0] or not ({"accession", "sop_instance_uid"} & set(rows[0])):
        raise UserError(f"{Path(csv_path).name}: need a header with 'label' and 'accession' or 'sop_instance_uid'")
    added, unknown, bad = 0, 0, []
    with Store.open(db) as store:
        by_accession, by_sop = {}, {}
        for d in details(store):
            if d.summary.accession_number:
                by_accession[d.summary.accession_number] = d.summary.id
            for film in d.films:
                by_sop[film.sop_instance_uid] = (d.summary.id, film.id)
        for line, row in enumerate(rows, start=2):
            label = (row.get("label") or "").strip().upper().replace(" ", "_")
            if label not in site.READ_LABELS:
                bad.append(line)
                continue
            sop = (row.get("sop_instance_uid") or "").strip()
            target = by_sop.get(sop) if sop else (by_accession.get((row.get("accession") or "").strip()), None)
            if not target or target[0] is None:
                unknown += 1
                continue
            store.add_read(target[0], label, (row.get("reader") or reader).strip() or reader,
                           comment=(row.get("comment") or None), film_id=target[1])
            added += 1
    return {"added": added, "unknown": unknown, "bad_label_lines": bad}


def set_shadow(db: str, on: bool, who: str) -> str:
    with Store.open(db) as store:
        store.set_setting(SHADOW_MODE, "on" if on else "off", changed_by=who)
        return store.get_setting(SHADOW_MODE)
