"""Real servers for the node's end-to-end tests: Debian's Orthanc and ``pneumoscan node``
processes, each on free ports in a temporary folder, their output kept in files to grep."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom

SRC = Path(__file__).resolve().parents[1] / "src"
WAIT_S = 120  # bounds a hang on a loaded machine; nothing is asserted about time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never happened: {what}")


class Orthanc:
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
        self.log = open(folder / "orthanc.log", "w")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
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

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class NodeProcess:
    """``pneumoscan -v node ...`` in a subprocess (debug logging on: the leak test reads all of it)."""

    def __init__(self, folder: Path, *args: str, port: int | None = None, db: str | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.db = db or f"sqlite:///{folder / 'node.db'}"
        self.log_path = folder / f"node-{time.monotonic_ns()}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.cli", "-v", "node", "--spool",
                                      str(folder / "spool"), "--port", str(self.port), "--db", self.db, *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._listening, "node listening")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        return "Ctrl+C stops" in self.log_path.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
