"""Sending results: C-STORE to PACS peers and/or STOW-RS, bounded retries, then a dead letter.

Every result object is written durably to ``SPOOL/staged`` before its result is recorded in
the store and moves to ``SPOOL/outbox`` after, so a crash between scoring and sending loses
nothing: the next start sends what is there (staged objects too, without a store record). An object that still
cannot be delivered after ``retries`` attempts (backoff doubling from ``backoff_s``) moves to
``SPOOL/deadletter`` with a JSON note of where it was going and why it failed;
``pneumoscan node --resend`` tries those again. Objects carry deterministic UIDs, so a second
delivery of one that did arrive is a duplicate the PACS recognises, not a second report.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pneumoscan.core import files
from pneumoscan.node.config import Destination, NodeConfig
from pneumoscan.node.spool import durable_write

log = logging.getLogger(__name__)

SENT_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7")  # Comprehensive SR, SC


@dataclass
class Outcome:
    ok: bool
    attempts: int
    reason: str = ""


OK_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and warnings: delivered


def _cstore(datasets: list[pydicom.Dataset], dest: Destination, cfg: NodeConfig) -> list[str | None]:
    """C-STORE each dataset over one association; per dataset None (delivered) or the reason
    (never an attribute value)."""
    from pynetdicom import AE

    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout
    ae.connection_timeout = min(cfg.network_timeout, 10.0)
    ae.maximum_pdu_size = cfg.max_pdu
    for sop_class in SENT_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return ["association rejected or peer unreachable"] * len(datasets)
    reasons: list[str | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                reasons.append("association aborted")
                continue
            code = getattr(assoc.send_c_store(ds), "Status", None)
            reasons.append("no response (timeout or aborted association)" if code is None else
                           None if code in OK_STATUSES else f"C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return reasons


def _stow(datasets: list[pydicom.Dataset], dest: Destination, cfg: NodeConfig) -> list[str | None]:
    from dicomweb_client.api import DICOMwebClient

    try:
        DICOMwebClient(url=dest.url).store_instances(datasets)
        return [None] * len(datasets)
    except Exception as exc:  # requests/HTTP errors; their text names the URL, never the dataset
        return [f"STOW-RS failed ({type(exc).__name__})"] * len(datasets)


def send_once(datasets: list[pydicom.Dataset], dest: Destination, cfg: NodeConfig) -> list[str | None]:
    try:
        return _cstore(datasets, dest, cfg) if dest.kind == "dicom" else _stow(datasets, dest, cfg)
    except Exception as exc:  # a socket error mid-way: a failed attempt, not a crash of the node
        return [f"{type(exc).__name__} while sending"] * len(datasets)


def send(datasets: list[pydicom.Dataset], dest: Destination, cfg: NodeConfig, sleep=time.sleep) -> list[Outcome]:
    """Up to ``cfg.retries`` attempts with doubling backoff; each attempt resends only what failed."""
    retries = max(1, cfg.retries)
    outcomes: list[Outcome | None] = [None] * len(datasets)
    todo, reasons = list(range(len(datasets))), {}
    for attempt in range(1, retries + 1):
        for i, reason in zip(todo, send_once([datasets[i] for i in todo], dest, cfg)):
            if reason is None:
                outcomes[i] = Outcome(True, attempt)
            reasons[i] = reason
        todo = [i for i in todo if outcomes[i] is None]
        if not todo:
            break
        if attempt < retries:
            sleep(cfg.backoff_s * 2 ** (attempt - 1))
    for i in todo:
        outcomes[i] = Outcome(False, retries, reasons[i])
    return outcomes


class Outbox:
    """Result objects waiting for delivery, and those that failed (dead letters)."""

    def __init__(self, root: Path) -> None:
        self.staged = Path(root) / "staged"
        self.outbox = Path(root) / "outbox"
        self.deadletter = Path(root) / "deadletter"
        for folder in (self.staged, self.outbox, self.deadletter):
            folder.mkdir(parents=True, exist_ok=True)

    def stage(self, ds: pydicom.Dataset) -> Path:
        """Durably keep ``ds`` before its result is recorded: a crash after this loses nothing."""
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = self.staged / f"{ds.SOPInstanceUID}.dcm"  # result UIDs are ours: no patient data in them
        durable_write(path, buf.getvalue())
        return path

    def publish(self, staged: Path, meta: dict | None = None) -> Path:
        """Hand a staged object to the delivery loop, ``meta`` (the store's result id) beside it."""
        target = self.outbox / staged.name
        files.write_json(target.with_suffix(".json"), meta or {})
        os.replace(staged, target)
        return target

    def recover(self) -> int:
        """Objects staged by a process that died before recording them: deliver them anyway."""
        staged = sorted(self.staged.glob("*.dcm"))
        for path in staged:
            self.publish(path)
        return len(staged)

    def meta(self, path: Path) -> dict:
        try:
            return json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return {}

    def pending(self) -> list[Path]:
        return sorted(self.outbox.glob("*.dcm"))

    def dead(self) -> list[Path]:
        return sorted(self.deadletter.glob("*.dcm"))

    def bury(self, path: Path, dest: Destination, outcome: Outcome) -> Path:
        """Move one object to the dead letters for ``dest``, with the reason beside it."""
        target = self.deadletter / f"{path.stem}.{_slug(dest.name)}.dcm"
        durable_write(target, path.read_bytes())
        files.write_json(target.with_suffix(".json"), {**self.meta(path), "destination": dest.to_dict(),
                                                       "reason": outcome.reason, "attempts": outcome.attempts,
                                                       "time": time.time()})
        return target

    def note(self, dead: Path) -> dict:
        return json.loads(dead.with_suffix(".json").read_text())

    def remove_dead(self, dead: Path) -> None:
        dead.unlink(missing_ok=True)
        dead.with_suffix(".json").unlink(missing_ok=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:60]


def deliver(outbox: Outbox, paths: list[Path], cfg: NodeConfig, record=None) -> None:
    """Send outbox objects to every destination (one association each); failures go to the dead
    letters; the outbox copies are removed once each destination has either taken them or has a
    dead letter. ``record(meta, destination, outcome)`` is told every final outcome."""
    datasets = [pydicom.dcmread(p) for p in paths]
    metas = [outbox.meta(p) for p in paths]
    for dest in cfg.destinations:
        for path, ds, meta, outcome in zip(paths, datasets, metas, send(datasets, dest, cfg)):
            if not outcome.ok:
                outbox.bury(path, dest, outcome)
                log.warning("result ...%s not delivered to %s after %d attempts (%s); kept in the dead-letter "
                            "folder", ds.SOPInstanceUID[-8:], dest.name, outcome.attempts, outcome.reason)
            if record is not None:
                record(meta, dest, outcome)
    for path in paths:
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def resend(outbox: Outbox, cfg: NodeConfig, record=None) -> tuple[int, int]:
    """Try every dead letter again (to the destination it failed for): (delivered, still failing)."""
    by_dest: dict[Destination, list[Path]] = {}
    for dead in outbox.dead():
        by_dest.setdefault(Destination.from_dict(outbox.note(dead)["destination"]), []).append(dead)
    ok = failed = 0
    for dest, deads in by_dest.items():
        for dead, outcome in zip(deads, send([pydicom.dcmread(d) for d in deads], dest, cfg)):
            note = outbox.note(dead)
            if record is not None:
                record(note, dest, outcome)
            if outcome.ok:
                outbox.remove_dead(dead)
                ok += 1
            else:
                files.write_json(dead.with_suffix(".json"), {**note, "reason": outcome.reason, "time": time.time()})
                failed += 1
    return ok, failed
