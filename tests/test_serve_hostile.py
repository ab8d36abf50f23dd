"""Hostile and broken clients against a real `pneumoscan serve` on 127.0.0.1, with raw sockets.

Short timeouts are configured so the tests are quick; what is checked is behaviour (answered 401
before the body, closed, 408, 503), never how many milliseconds it took.
"""

from __future__ import annotations

import http.client
import io
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray
from servers import cli_env, free_port

pytestmark = pytest.mark.slow

KEY = "hostile-test-key"
MiB = 2**20


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_xray(np.random.default_rng(seed), 1, 96)).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """`pneumoscan serve` in a subprocess with its own temp folder and log file."""

    def __init__(self, model: Path, folder: Path, *extra: str) -> None:
        self.port = free_port()
        self.tmp = folder / "spool"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "serve.log"
        env = cli_env(PNEUMOSCAN_API_KEY=KEY, TMPDIR=str(self.tmp))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.cli", "serve", "--model", str(model),
                                      "--port", str(self.port), "--engine", "torch", *extra],
                                     env=env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if self.get("/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start: " + self.log()
            time.sleep(0.2)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def get(self, path: str, key: str | None = KEY) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", path, headers={"X-API-Key": key} if key else {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def predict(self, blob: bytes, name: str = "x.png", key: str = KEY) -> tuple[int, dict]:
        boundary = "hostileboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request("POST", "/v1/predict", body=body, headers={
                "X-API-Key": key, "Content-Type": f"multipart/form-data; boundary={boundary}"})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        finally:
            c.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def spool_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def upload_head(length: int | None, key: str | None, path: str = "/v1/predict/batch") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: multipart/form-data; boundary=b"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key:
        lines.append(f"X-API-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    s = Server(trained_model, tmp_path_factory.mktemp("hostile"), "--header-timeout", "2", "--body-timeout", "3",
               "--keep-alive", "2", "--max-connections", "300", "--max-in-flight", "4", "--max-upload-mb", "1")
    yield s
    s.stop()


# --- 1. authenticate before reading ------------------------------------------------------------

def test_unauthenticated_500_mib_upload_is_refused_before_its_body(server):
    before = spool_bytes(server.tmp)
    sock = server.connect()
    sock.sendall(upload_head(500 * MiB, key=None))
    # not one body byte sent: the answer can only have come from the headers
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"connection: close" in head.lower()
    sent, chunk = 0, b"\0" * MiB
    try:
        while sent < 500 * MiB:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.close()
    assert sent < 64 * MiB, "the server kept reading a body it had refused"  # socket buffers, not 500 MiB
    assert spool_bytes(server.tmp) <= before


def test_unauthenticated_chunked_upload_is_refused_before_its_body(server):
    sock = server.connect()
    sock.sendall(upload_head(None, key="wrong key"))
    assert read_answer(sock).startswith(b"HTTP/1.1 401")
    sock.close()


def test_content_length_over_the_limit_refused_from_the_header(server):
    sock = server.connect()
    sock.sendall(upload_head(400 * MiB, key=KEY))
    assert read_answer(sock).startswith(b"HTTP/1.1 413")
    sock.close()


def offer_chunks(server, head: bytes, n: int = 200) -> tuple[int, bytes]:
    """Send ``head``, then up to ``n`` chunks of 1 MiB until the server stops reading; (chunks
    sent, the server's whole answer)."""
    sock = server.connect()
    sock.sendall(head)
    sent = 0
    try:
        for _ in range(n):
            sock.sendall(b"100000\r\n" + b"\0" * 0x100000 + b"\r\n")
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_answer(sock)
    sock.close()
    return sent, answer


def test_chunked_body_is_cut_at_the_limit(server):
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
    # 200 MiB offered; the limit is about 1 MiB
    sent, answer = offer_chunks(server, upload_head(None, key=KEY, path="/v1/predict")
                                + b"%x\r\n%s\r\n" % (len(part), part))
    assert sent < 200 and answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])


def test_an_early_answer_does_not_read_the_rest_of_the_body(server):
    # not multipart at all: 400 at once
    sent, answer = offer_chunks(server, upload_head(None, key=KEY, path="/v1/predict"))
    assert sent < 200 and answer.startswith(b"HTTP/1.1 4"), (sent, answer[:200])


# --- 2. timeouts and caps -----------------------------------------------------------------------

def test_idle_connection_is_closed(server):
    sock = server.connect()
    assert read_answer(sock) == b""  # closed without a word: nothing was asked


def test_half_a_head_gets_408_and_is_closed(server):
    sock = server.connect()
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-")
    assert read_answer(sock).startswith(b"HTTP/1.1 408")


def test_half_a_body_gets_408_and_is_closed(server):
    sock = server.connect()
    sock.sendall(upload_head(100_000, key=KEY, path="/v1/predict") + b"--b\r\n")
    answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b'"timeout"' in answer, answer


def test_requests_in_flight_are_capped_with_retry_after(server):
    stalled = []
    for _ in range(4):  # --max-in-flight 4: four uploads that stall halfway hold every place
        s = server.connect()
        s.sendall(upload_head(100_000, key=KEY, path="/v1/predict") + b"--b\r\n")
        stalled.append(s)
    time.sleep(0.5)  # let the server admit them (the check below does not depend on it: it retries)
    status = None
    for _ in range(10):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("GET", "/v1/model", headers={"X-API-Key": KEY})
        r = c.getresponse()
        status, retry = r.status, r.getheader("Retry-After")
        c.close()
        if status == 503:
            break
    health = server.get("/v1/health", key=None)[0]  # liveness is not capped
    for s in stalled:
        s.close()
    assert status == 503 and retry and int(retry) >= 1
    assert health == 200


def test_1100_idle_connections_do_not_stop_a_well_behaved_client(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the open-file limit ({hard}) is below 1,300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard) if hard != resource.RLIM_INFINITY
                                                    else 4096), hard))
    idle = []
    try:
        for _ in range(1100):
            try:
                idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
            except OSError:
                break  # the backlog may refuse some: what matters is the client below
        assert len(idle) > 300  # more than --max-connections were opened
        assert server.get("/v1/health")[0] == 200
        status, body = server.predict(png_bytes())
        assert status == 200 and 0 <= body["probability"] <= 1
    finally:
        for s in idle:
            s.close()
    assert "Too many open files" not in server.log()
