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


def _cstore(ds: pydicom.Dataset, dest: Destination, cfg: NodeConfig) -> str | None:
    """One C-STORE; None on success, else the reason (no attribute values in it)."""
    from pynetdicom import AE

    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout
    ae.connection_timeout = min(cfg.network_timeout, 10.0)
    ae.maximum_pdu_size = cfg.max_pdu
    for sop_class in SENT_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return "association rejected or peer unreachable"
    try:
        status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            return "no response (timeout or aborted association)"
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success and warnings are delivered
            return f"C-STORE status 0x{code:04X}"
        return None
    finally:
        assoc.release()


def _stow(ds: pydicom.Dataset, dest: Destination, cfg: NodeConfig) -> str | None:
    from dicomweb_client.api import DICOMwebClient

    try:
        DICOMwebClient(url=dest.url).store_instances([ds])
        return None
    except Exception as exc:  # requests/HTTP errors; their text names the URL, never the dataset
        return f"STOW-RS failed ({type(exc).__name__})"


def send_once(ds: pydicom.Dataset, dest: Destination, cfg: NodeConfig) -> str | None:
    try:
        return _cstore(ds, dest, cfg) if dest.kind == "dicom" else _stow(ds, dest, cfg)
    except Exception as exc:  # a socket error mid-way: a failed attempt, not a crash of the node
        return f"{type(exc).__name__} while sending"


def send(ds: pydicom.Dataset, dest: Destination, cfg: NodeConfig, sleep=time.sleep) -> Outcome:
    """Up to ``cfg.retries`` attempts with doubling backoff."""
    reason = ""
    for attempt in range(1, max(1, cfg.retries) + 1):
        reason = send_once(ds, dest, cfg) or ""
        if not reason:
            return Outcome(True, attempt)
        if attempt < cfg.retries:
            sleep(cfg.backoff_s * 2 ** (attempt - 1))
    return Outcome(False, max(1, cfg.retries), reason)


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


def deliver(outbox: Outbox, path: Path, cfg: NodeConfig, record=None) -> list[tuple[Destination, Outcome]]:
    """Send one outbox object to every destination; failures go to the dead letters; the
    outbox copy is removed once each destination has either taken it or has a dead letter.
    ``record(meta, destination, outcome)`` is told every final outcome."""
    ds = pydicom.dcmread(path)
    meta = outbox.meta(path)
    done = []
    for dest in cfg.destinations:
        outcome = send(ds, dest, cfg)
        if not outcome.ok:
            outbox.bury(path, dest, outcome)
            log.warning("result ...%s not delivered to %s after %d attempts (%s); kept in the dead-letter folder",
                        ds.SOPInstanceUID[-8:], dest.name, outcome.attempts, outcome.reason)
        if record is not None:
            record(meta, dest, outcome)
        done.append((dest, outcome))
    path.with_suffix(".json").unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return done


def resend(outbox: Outbox, cfg: NodeConfig, record=None) -> tuple[int, int]:
    """Try every dead letter again (to the destination it failed for): (delivered, still failing)."""
    ok = failed = 0
    for dead in outbox.dead():
        note = outbox.note(dead)
        dest = Destination.from_dict(note["destination"])
        outcome = send(pydicom.dcmread(dead), dest, cfg)
        if record is not None:
            record(note, dest, outcome)
        if outcome.ok:
            outbox.remove_dead(dead)
            ok += 1
        else:
            files.write_json(dead.with_suffix(".json"), {**note, "reason": outcome.reason, "time": time.time()})
            failed += 1
    return ok, failed
