"""The spool: every received instance on disk, durably, before the sender hears "success".

Layout: ``SPOOL/incoming/<study>/<instance>.dcm`` where both names are hashes of the UIDs (file
names never carry identifiers). A file appears only complete: it is written to a temporary
name, fsynced, renamed, and the folder fsynced, so a crash or power cut leaves either nothing
(the sender got no success and sends again) or the whole instance (picked up at the next
start). A file goes once its film's outcome is recorded in the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def _name(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


def durable_write(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + fsync of the folder: all of ``data`` at ``path``, or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Spool:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def save(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Store one instance durably; the same instance again replaces its file (one copy)."""
        path = self.incoming / _name(study_uid) / f"{_name(sop_uid)}.dcm"
        durable_write(path, data)
        return path

    def files(self) -> list[Path]:
        """Every complete spooled instance, oldest first."""
        found = []
        for f in self.incoming.glob("*/*.dcm"):
            try:
                found.append((f.stat().st_mtime, f))
            except FileNotFoundError:
                continue
        return [f for _, f in sorted(found)]

    def quarantine(self, path: Path) -> None:
        """Move a file that no longer parses out of the way, for a human to look at."""
        target = self.root / "unreadable" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)

    def clear(self) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
