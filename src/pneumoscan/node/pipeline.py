"""From spooled instances to result objects in the outbox, with everything in the store.

The store is the work queue. Each round (``tick``): spooled files not yet known are recorded
(``upsert_film``, received at the file's time, so after a restart old files are stable at
once; a film the store already finished — a re-sent film — is dropped, no second result);
then the films of studies quiet for ``stable_seconds`` are claimed (``claim_films``: two nodes
on one database never get the same film). Each claimed film is scored (``selection`` says it is
eligible and it decodes) or recorded with the reason it is not. A study in which nothing is
scored gets one SR listing the reasons. Result objects reach the outbox durably before the
spool copies go, so a crash at any point repeats work rather than losing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import pydicom

from pneumoscan import store as st
from pneumoscan.node import results, selection
from pneumoscan.node.config import NodeConfig, tag
from pneumoscan.node.delivery import Outbox
from pneumoscan.node.scoring import Scorer
from pneumoscan.node.spool import Spool

log = logging.getLogger(__name__)

POLL_S = 0.1
SWEEP_S = 2.0
CLAIM_LIMIT = 32
RECLAIM_AFTER_S = 600.0  # a claim this old belongs to a node that died: another may take it
FINAL = (st.SCORED, st.NOT_SCORED, st.FAILED)


@dataclass
class Instance:
    film: st.Film
    ds: pydicom.Dataset | None
    reason: str | None = None


@dataclass
class Round:
    ingested: int = 0
    repeated: int = 0
    scored: int = 0
    not_scored: int = 0
    objects: list[str] = field(default_factory=list)


def read_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, defer_size="256 KB")
    except Exception:  # the receiver checked the UIDs; a file damaged since is just unreadable
        return None


def _text(ds: pydicom.Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip()
    return text[:limit] or None


def film_header(ds: pydicom.Dataset) -> st.FilmHeader:
    """What the store keeps of an instance (the worklist needs name and accession; logs never)."""
    try:
        study_date = datetime.strptime(str(ds.get("StudyDate", "")), "%Y%m%d").date()
    except ValueError:
        study_date = None
    return st.FilmHeader(
        study_instance_uid=str(ds.StudyInstanceUID), sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=_text(ds, "SeriesInstanceUID"), sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality", 16), view_position=_text(ds, "ViewPosition", 16),
        body_part=_text(ds, "BodyPartExamined"), manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model=_text(ds, "ManufacturerModelName"), accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName", 324), study_date=study_date)


class Pipeline:
    def __init__(self, cfg: NodeConfig, spool: Spool, outbox: Outbox, scorer: Scorer, store: st.Store,
                 rules: selection.Rules = selection.Rules()) -> None:
        self.cfg, self.spool, self.outbox, self.scorer, self.store, self.rules = \
            cfg, spool, outbox, scorer, store, rules
        self.known: dict[Path, int] = {}  # spooled files already recorded in the store -> film id
        self.swept = time.monotonic()
        self.outbox_ready = threading.Event()
        a = scorer.algorithm
        store.register_model(a.sha256, a.name, a.version)

    def ingest(self) -> Round:
        out = Round()
        for path in self.spool.files():
            if path in self.known:
                continue
            ds = read_header(path)
            if ds is None or "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
                self.spool.quarantine(path)
                log.warning("a spooled file became unreadable; moved to the spool's unreadable folder")
                continue
            received = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            up = self.store.upsert_film(film_header(ds), str(path), received_at=received)
            if up.film.state in FINAL:  # a re-sent film: it has its result already
                path.unlink(missing_ok=True)
                out.repeated += 1
                continue
            self.known[path] = up.film.id
            out.ingested += 1
        return out

    def sweep(self) -> None:
        """Drop spooled copies of films another node finished (nodes sharing a database may both
        receive a film; the one that claims it scores it from its own copy)."""
        if time.monotonic() - self.swept < SWEEP_S:
            return
        self.swept = time.monotonic()
        for path, film_id in list(self.known.items()):
            film = self.store.film(film_id)
            if film is None or film.state in FINAL:
                path.unlink(missing_ok=True)
                self.known.pop(path, None)

    def tick(self) -> Round:
        """Record new files, then process the claimed films of every stable study, scored in one
        batch (one model call for a burst of one-film studies rather than one each)."""
        out = self.ingest()
        self.sweep()
        films = self.store.claim_films(self.cfg.worker, CLAIM_LIMIT, quiet_seconds=self.cfg.stable_seconds,
                                       reclaim_after_s=RECLAIM_AFTER_S)
        if films:
            try:
                self.process(films, out)
            except Exception:  # retry study by study, so one bad study cannot hold the others
                by_study: dict[int, list[st.Film]] = defaultdict(list)
                for film in films:
                    by_study[film.study_id].append(film)
                for group in by_study.values():
                    try:
                        self.process(group, out)
                    except Exception:  # its claims age out and it is tried again
                        log.exception("a study could not be processed; retried after %.0f s", RECLAIM_AFTER_S)
        if out.objects:
            self.outbox_ready.set()
        return out

    def process(self, films: list[st.Film], out: Round) -> None:
        t0 = time.perf_counter()
        instances = [Instance(f, read_header(Path(f.spool_path)) if f.spool_path else None) for f in films]
        for inst in instances:
            inst.reason = "unreadable DICOM file" if inst.ds is None else selection.reason_not_scored(inst.ds, self.rules)
        scored = self._score([i for i in instances if i.reason is None], out)
        for inst in instances:
            if inst.reason is not None:
                (self.store.mark_failed if inst.reason.startswith("unreadable") else self.store.mark_not_scored)(
                    inst.film.id, inst.reason)
        by_study: dict[int, list[Instance]] = defaultdict(list)
        for inst in instances:
            by_study[inst.film.study_id].append(inst)
        ms = (time.perf_counter() - t0) * 1000
        for study_id, group in by_study.items():
            rejected = [i for i in group if i.reason is not None]
            out.not_scored += len(rejected)
            if len(rejected) == len(group) and self._nothing_scored(study_id):
                self._no_eligible(rejected, out)
            for inst in group:
                if inst.film.spool_path:
                    Path(inst.film.spool_path).unlink(missing_ok=True)
                    self.known.pop(Path(inst.film.spool_path), None)
            study_uid = next((i.ds.StudyInstanceUID for i in group if i.ds is not None), "")
            log.info("study %s: %d instance(s) processed, %d scored, %d not scored (batch of %d: %.0f ms)",
                     tag(study_uid), len(group), len(group) - len(rejected), len(rejected), len(instances), ms)

    def _score(self, eligible: list[Instance], out: Round) -> int:
        if not eligible:
            return 0
        t0 = time.perf_counter()
        decoded = self.scorer.decode([Path(i.film.spool_path) for i in eligible])
        for index, reason in decoded.failed.items():
            eligible[index].reason = reason
        verdicts = self.scorer.assess(decoded)
        overlays = self.scorer.overlays(decoded.images, verdicts) if self.cfg.secondary_capture else None
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(verdicts))
        a = self.scorer.algorithm
        for j, (index, verdict) in enumerate(zip(decoded.kept, verdicts)):
            inst = eligible[index]
            sr = results.film_sr(inst.ds, verdict, a)
            sc = None
            if overlays is not None:
                sc = results.overlay_sc(inst.ds, overlays[j], a, verdict.label, verdict.probability)
            staged = [self.outbox.stage(ds) for ds in (sr, sc) if ds is not None]  # before the store says "scored"
            result = self.store.record_result(
                inst.film.id, a.sha256, probability=verdict.probability, label=verdict.label,
                threshold=verdict.threshold, flags=[st.Flag(c, d) for c, d in zip(verdict.flags, verdict.details)],
                ood_score=verdict.ood_score, duration_ms=ms, sr_sop_instance_uid=sr.SOPInstanceUID,
                sc_sop_instance_uid=sc.SOPInstanceUID if sc is not None else None)
            for path in staged:
                self._post(path, result.id, out)
        out.scored += len(verdicts)
        return len(verdicts)

    def _post(self, staged: Path, result_id: int | None, out: Round) -> None:
        """To the outbox, with a pending delivery per destination in the store."""
        for dest in self.cfg.destinations:
            if result_id is not None:
                self.store.record_delivery(result_id, dest.name, dest.store_kind, state=st.PENDING, attempted=False)
        self.outbox.publish(staged, {"result_id": result_id})
        out.objects.append(staged.stem)

    def _nothing_scored(self, study_id: int) -> bool:
        detail = self.store.study(study_id)
        return detail is not None and all(f.state in (st.NOT_SCORED, st.FAILED) for f in detail.films)

    def _no_eligible(self, rejected: list[Instance], out: Round) -> None:
        readable = [i for i in rejected if i.ds is not None]
        if readable:
            sr = results.study_not_scored_sr([i.ds for i in readable], [i.reason for i in readable],
                                             self.scorer.algorithm)
            self._post(self.outbox.stage(sr), None, out)

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set; a store outage is logged and retried, not fatal."""
        while not stop.is_set():
            try:
                self.tick()
            except st.StoreError as exc:
                log.error("%s; retrying", exc)
                stop.wait(2.0)
            stop.wait(POLL_S)
