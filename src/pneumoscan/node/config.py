"""The node's settings in one place, and the one way logs name a study.

Defaults are safe ones: bound to 127.0.0.1, a few associations at a time, bounded PDUs and
datasets, timeouts on every network wait (a peer that stops talking must not hold a thread).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscan.core.errors import UserError

AE_TITLE = "PNEUMOSCAN"
PORT = 11112
MAX_AE_LEN = 16


@dataclass(frozen=True)
class Destination:
    """Where results go: a C-STORE peer (AE@host:port) or a STOW-RS URL."""

    kind: str  # "dicom" | "stow"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @property
    def name(self) -> str:
        """How logs and the store name it (no patient data in either)."""
        return f"{self.ae_title}@{self.host}:{self.port}" if self.kind == "dicom" else self.url

    @property
    def store_kind(self) -> str:
        return "cstore" if self.kind == "dicom" else "stow"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ae_title": self.ae_title, "host": self.host, "port": self.port, "url": self.url}

    @classmethod
    def from_dict(cls, d: dict) -> "Destination":
        return cls(d["kind"], d.get("ae_title", ""), d.get("host", ""), int(d.get("port", 0)), d.get("url", ""))


_DEST = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def parse_destination(text: str) -> Destination:
    """``AE@host:port`` -> Destination, or a UserError saying what the form is."""
    m = _DEST.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise UserError(f"--send-to {text!r}: expected AE@host:port, e.g. ORTHANC@127.0.0.1:4242")
    return Destination("dicom", check_ae(m["ae"]), m["host"].strip("[]"), int(m["port"]))


def stow_destination(url: str) -> Destination:
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--stow {url!r}: expected an http(s) URL of a DICOMweb service")
    return Destination("stow", url=url.rstrip("/"))


def check_ae(title: str) -> str:
    """AE titles: 1-16 printable ASCII characters, no backslash, not all spaces."""
    t = title.strip()
    if not t or len(t) > MAX_AE_LEN or not all(32 <= ord(c) < 127 and c != "\\" for c in t):
        raise UserError(f"AE title {title!r}: 1 to 16 printable ASCII characters without backslash")
    return t


@dataclass
class NodeConfig:
    spool: Path
    ae_title: str = AE_TITLE
    host: str = "127.0.0.1"
    port: int = PORT
    allow: tuple[str, ...] = ()  # calling AE titles let in; empty = any
    stable_seconds: float = 3.0
    destinations: tuple[Destination, ...] = ()
    secondary_capture: bool = False
    db: str | None = None  # SQLAlchemy URL; default sqlite file in the spool
    model: str | None = None
    engine: str = "auto"
    threshold: float | None = None
    # limits (issue 22): no peer holds a thread or memory without bound
    acse_timeout: float = 30.0  # ARTIM: association request/release
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_associations: int = 8
    grace_seconds: float = 10.0  # on stop: open associations may finish this long, then are aborted
    max_pdu: int = 64 * 1024  # bytes per PDU, both ways
    max_dataset_bytes: int = 256 * 1024 * 1024
    # delivery
    retries: int = 3
    backoff_s: float = 0.5
    tls: dict = field(default_factory=dict)  # cert, key, ca
    worker: str = ""  # this process's name in the store (claims)

    @property
    def spool_dir(self) -> Path:
        return Path(self.spool)

    def db_url(self) -> str:
        return self.db or f"sqlite:///{(Path(self.spool) / 'node.db').resolve()}"


def tag(uid: str) -> str:
    """A study or instance as logs name it: a short hash of its UID, never the UID or a value."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:10]
