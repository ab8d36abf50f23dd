"""Real servers for tests, started on free ports in temporary folders and stopped afterwards.

``postgres_server()`` runs Debian's PostgreSQL (``initdb`` + ``pg_ctl``) as an unprivileged user;
tests skip with the apt line when it is not installed. Used by the ``postgres_url`` fixture of
conftest.py; other servers (Orthanc, ...) belong here too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_APT = "apt-get install -y postgresql"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def _as_unprivileged() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no 'postgres' user to run PostgreSQL as: " + POSTGRES_APT)
    return ["runuser", "-u", "postgres", "--"]


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    data_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL cluster (trust auth on 127.0.0.1 only) and stop it after."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed: " + POSTGRES_APT)
    prefix = _as_unprivileged()
    root = Path(tempfile.mkdtemp(prefix="pneumoscan-pg-"))  # under /tmp: the postgres user can reach it
    if prefix:
        shutil.chown(root, "postgres")
    data, port, user = root / "data", free_port(), "pneumoscan"
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                        "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
        yield PostgresServer("127.0.0.1", port, user, data)
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
