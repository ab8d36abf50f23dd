"""Atomic output files: write to a temporary file beside the target, then rename.

An interrupted run therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    """Content hash that names a model or weights file wherever it is copied."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


DIGEST_HEX = 16  # hex digits kept of a data file's sha256: 64 bits, no collision among millions of files


def content_digest(path: str | Path) -> str:
    """A data file's identity by content (truncated sha256): the same image under another name or
    folder has the same digest, so overlap with a model's training data is found wherever it moved."""
    return file_sha256(path)[:DIGEST_HEX]


def content_digests(paths) -> list[str]:
    """Sorted, unique ``content_digest`` of each file: the compact form a model stores."""
    return sorted({content_digest(p) for p in paths})
