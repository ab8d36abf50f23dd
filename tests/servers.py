"""Real servers for tests, started on free ports in temporary folders and stopped afterwards.

The one place tests start servers: ``free_port``, ``wait_for`` and ``LoggedProcess`` (a server
in a subprocess, its output in a file in its folder to grep); ``postgres_server()`` runs Debian's
PostgreSQL (``initdb`` + ``pg_ctl``) as an unprivileged user (the ``postgres_url`` fixture of
conftest.py); ``Orthanc`` runs Debian's Orthanc and ``NodeProcess`` a ``pneumoscan -v node``, for
the node's end-to-end tests. Tests skip with the apt line when a binary is not installed.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

POSTGRES_APT = "apt-get install -y postgresql"
SRC = Path(__file__).resolve().parents[1] / "src"
WAIT_S = 120  # bounds a hang on a loaded machine; nothing is asserted about time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = WAIT_S, interval: float = 0.2):
    """``check()``'s first truthy value: events decide, ``timeout`` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"never happened: {what}")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m pneumoscan.cli`` subprocess: this checkout's src first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **extra}


class LoggedProcess:
    """A server in a subprocess, stdout and stderr together in ``log_path`` (to grep afterwards)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def close(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s; the log file is closed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


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


class Orthanc(LoggedProcess):
    """Debian's Orthanc on free DICOM and HTTP ports, its storage and log in ``folder``."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None,
                 dicom_port: int | None = None, plugins: list[str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.aet, self.dicom_port, self.http_port = aet, dicom_port or free_port(), free_port()
        config = {"Name": aet, "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
                  "DicomModalities": modalities or {}, "StableAge": 1, "ConcurrentJobs": 2,
                  "Plugins": plugins or []}
        (folder / "orthanc.json").write_text(json.dumps(config))
        super().__init__(["/usr/sbin/Orthanc", str(folder / "orthanc.json")], folder / "orthanc.log")
        wait_for(self._up, "Orthanc answering")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(payload).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read() or b"null")

    def put_modality(self, name: str, aet: str, port: int) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/modalities/{name}",
                                     data=json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode(),
                                     method="PUT")
        urllib.request.urlopen(req, timeout=30).close()

    def storescu(self, *files: Path) -> None:
        subprocess.run(["storescu", "-aec", self.aet, "127.0.0.1", str(self.dicom_port), *map(str, files)],
                       check=True, capture_output=True, timeout=120)

    def _lookup(self, sop_uid: str) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/lookup", data=sop_uid.encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            hits = [h for h in json.loads(r.read()) if h["Type"] == "Instance"]
        return hits[0]["ID"] if hits else ""

    def forward(self, modality: str, *sop_uids: str) -> None:
        """Orthanc C-STOREs these instances to the node (REST /modalities/{id}/store: synchronous)."""
        self.post(f"/modalities/{modality}/store", [self._lookup(u) for u in sop_uids])

    def instances_of(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        ids = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid,
                                                                       "Modality": modality}})
        out = []
        for i in ids:
            raw = self.get(f"/instances/{i}/file")
            out.append(pydicom.dcmread(io.BytesIO(raw)))
        return out


class NodeProcess(LoggedProcess):
    """``pneumoscan -v node ...`` in a subprocess (debug logging on: the leak test reads all of it)."""

    def __init__(self, folder: Path, *args: str, port: int | None = None, db: str | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.db = db or f"sqlite:///{folder / 'node.db'}"
        super().__init__([sys.executable, "-m", "pneumoscan.cli", "-v", "node", "--spool", str(folder / "spool"),
                          "--port", str(self.port), "--db", self.db, *args],
                         folder / f"node-{time.monotonic_ns()}.log", env=cli_env())
        wait_for(self._listening, "node listening")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        return "Ctrl+C stops" in self.log_path.read_text()

    def close(self) -> None:
        super().close(timeout=60)
