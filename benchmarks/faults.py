"""Fault suite: replays issue 22's hostile and faulty clients against a real `pneumoscan serve`.

Starts the server in its own process on 127.0.0.1 (and only there) with an API key and its own
temp folder, runs each probe with bounded sizes and durations, and prints one markdown table:
probe, expectation, result, the server's peak RSS growth during the probe, time to answer, and
for the load probes the throughput of well-behaved clients during the attack against without it.

    python benchmarks/faults.py                       # bundled model, ~3 minutes on 2 cores
    python benchmarks/faults.py --seconds 20 --out benchmarks/faults.md

Peak RSS growth: VmHWM after the probe minus VmRSS before, summed over the server and its
heavy-decode worker, with the high-water marks reset before each probe (/proc/PID/clear_refs;
Linux).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_serve_logs import PLANT, planted_dicom  # noqa: E402  (the same planted files as the test)

KEY = "faults-key"
MiB = 2**20
SIDE = 7071  # 50 M pixels: just under the default pixel limit
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, model: str | None) -> None:
        self.port, self.folder = free_port(), folder
        self.spool = folder / "spool"
        self.spool.mkdir()
        self.log_path = folder / "serve.log"
        env = os.environ | {"PYTHONPATH": str(REPO / "src"), "PNEUMOSCAN_API_KEY": KEY, "TMPDIR": str(self.spool)}
        args = [sys.executable, "-m", "pneumoscan.cli", "serve", "--port", str(self.port), "--header-timeout", "2",
                "--body-timeout", "5", "--keep-alive", "2", "--max-connections", "500", "--grace-seconds", "3"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args + (["--model", model] if model else []), env=env,
                                     stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            return request(self.port, "GET", "/v1/health")[0] == 200
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The server and its children (the heavy-decode worker)."""
        kids: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):  # a thread may have started it
            try:
                kids |= set(map(int, (task / "children").read_text().split()))
            except OSError:
                pass
        return [self.proc.pid, *sorted(kids)]

    def status(self, field: str) -> int:
        """Summed over the server and its children."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def reset_peak(self) -> int:
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        return self.status("VmRSS")

    def connect(self) -> socket.socket:
        return socket.create_connection((HOST, self.port), timeout=30)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    c = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def multipart(blob: bytes, name: str = "x.png") -> tuple[bytes, dict]:
    head = f'--b\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
    return head + blob + b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b", "X-API-Key": KEY}


def predict(port: int, blob: bytes, name: str = "x.png") -> int:
    body, headers = multipart(blob, name)
    return request(port, "POST", "/v1/predict", body, headers)[0]


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            return out
        if not data:
            return out
        out += data


def head(length: str, key: str | None, path: str = "/v1/predict/batch") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}", "Content-Type: multipart/form-data; boundary=b", length]
    return ("\r\n".join(lines + ([f"X-API-Key: {key}"] if key else [])) + "\r\n\r\n").encode()


def throughput(port: int, blob: bytes, seconds: float, clients: int = 4) -> float:
    """Answers per second to well-behaved clients posting a small X-ray."""
    done, stop = [0], time.monotonic() + seconds
    lock = threading.Lock()

    def loop():
        while time.monotonic() < stop:
            if predict(port, blob) == 200:
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def big_files(folder: Path) -> dict[str, bytes]:
    from test_decode_budget import dicom  # noqa: PLC0415

    rows = np.repeat((np.arange(SIDE) // 512 * 200).astype(np.uint16)[:, None], SIDE, axis=1)
    out = {"RLE DICOM 7071², 16-bit": dicom(rows, rle=True)}
    for label, array, fmt, kw in [("PNG 7071², 16-bit", np.zeros((SIDE, SIDE), np.uint16), "PNG", {}),
                                  ("TIFF 7071², float", np.zeros((SIDE, SIDE), np.float32), "TIFF",
                                   {"compression": "tiff_adobe_deflate"})]:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, **kw)
        out[label] = buf.getvalue()
    out["60000² header DICOM"] = dicom(np.zeros((8, 8)), rows_cols=(60000, 60000))
    return out


class Table:
    def __init__(self, server: Server) -> None:
        self.server, self.rows = server, []

    def probe(self, name: str, expectation: str, run) -> None:
        base = self.server.reset_peak()
        started = time.monotonic()
        result, answered = run()
        peak = self.server.status("VmHWM") - base
        took = answered if answered is not None else time.monotonic() - started
        self.rows.append((name, expectation, result, f"+{max(peak, 0) / 1e6:.0f} MB",
                          "" if took < 0 else f"{took:.2f} s"))
        print(f"  {name}: {result}", file=sys.stderr)

    def markdown(self) -> str:
        lines = ["| probe | expectation | result | peak RSS growth | time to answer |", "|---|---|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def probes(server: Server, table: Table, files: dict[str, bytes], small: bytes, seconds: float) -> None:
    port = server.port

    def unauthenticated():
        spool = sum(p.stat().st_size for p in server.spool.rglob("*") if p.is_file())
        sock = server.connect()
        t0 = time.monotonic()
        sock.sendall(head(f"Content-Length: {500 * MiB}", None))
        answer, took = sock.recv(4096), time.monotonic() - t0
        sent = 0
        try:
            while sent < 500 * MiB:
                sock.sendall(b"\0" * MiB)
                sent += MiB
        except OSError:
            pass
        sock.close()
        grew = sum(p.stat().st_size for p in server.spool.rglob("*") if p.is_file()) - spool
        return f"{answer[9:12].decode()} before any body byte; client got {sent // MiB} MiB into buffers; spool +{grew} B", took

    def slow(payload: bytes, label: str):
        def run():
            sock = server.connect()
            t0 = time.monotonic()
            if payload:
                sock.sendall(payload)
            answer = read_all(sock)
            return f"{answer[9:12].decode() or 'closed, no answer'} then closed ({label})", time.monotonic() - t0
        return run

    def idle_flood():
        socks = []
        for _ in range(1100):
            try:
                socks.append(server.connect())
            except OSError:
                break
        t0 = time.monotonic()
        status = predict(port, small)
        took = time.monotonic() - t0
        for s in socks:
            s.close()
        return f"{len(socks)} idle connections open; a client's predict: {status}", took

    def decode(label: str):
        def run():
            t0 = time.monotonic()
            status, body = request(port, "POST", "/v1/predict", *multipart(files[label], "big"))
            detail = body.decode(errors="replace")
            return (f"{status}" + ("" if status == 200 else f": {detail[:110]}")), time.monotonic() - t0
        return run

    table.probe("unauthenticated 500 MiB upload", "401 from the headers, connection closed, spool unchanged",
                unauthenticated)
    table.probe("idle connection", "closed after --header-timeout (2 s)", slow(b"", "idle"))
    table.probe("half a request head", "408, closed after --header-timeout (2 s)",
                slow(f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nX-API".encode(), "half head"))
    table.probe("half a body", "408, closed after --body-timeout (5 s)",
                slow(head("Content-Length: 100000", KEY, "/v1/predict") + b"--b\r\n", "half body"))
    table.probe("1,100 idle connections", "a well-behaved client still answered", idle_flood)
    for label in files:
        expect = "413 with the real size" if label.startswith("60000") else "decoded within budget or 413, ≤ 300 MB"
        table.probe(label, expect, decode(label))

    def leak():
        for blob in (planted_dicom(), planted_dicom(WindowCenter=PLANT, WindowWidth=PLANT),
                     planted_dicom(rle=True), planted_dicom(Modality=PLANT)):
            predict(port, blob, f"{PLANT}.dcm")
        request(port, "GET", f"/v1/{PLANT.replace('^', '%5E')}", headers={"X-API-Key": KEY})
        time.sleep(0.5)
        found = server.log_path.read_text().count("LEAKTEST")
        return f"{found} occurrences of the planted value in the log", -1

    table.probe("LEAKTEST^PATIENT in attributes, names, paths", "0 in the log", leak)

    def loaded(attack_blob: bytes, rounds: int = 3):
        """Quiet and attacked windows alternate ``rounds`` times, so load from other processes on a
        shared machine falls on both; the median of the per-round ratios is reported."""
        def run():
            ratios, quiet_all, noisy_all = [], [], []
            for _ in range(rounds):
                quiet = throughput(port, small, seconds)
                stop = threading.Event()

                def attacker():
                    while not stop.is_set():
                        predict(port, attack_blob)

                attackers = [threading.Thread(target=attacker) for _ in range(2)]
                for t in attackers:
                    t.start()
                noisy = throughput(port, small, seconds)
                stop.set()
                for t in attackers:
                    t.join()
                ratios.append(noisy / max(quiet, 1e-9))
                quiet_all.append(quiet)
                noisy_all.append(noisy)
            return (f"median {100 * float(np.median(ratios)):.0f}% of the quiet throughput "
                    f"(rounds: {', '.join(f'{100 * r:.0f}%' for r in ratios)}; "
                    f"{np.mean(noisy_all):.1f} vs {np.mean(quiet_all):.1f} req/s)"), -1
        return run

    table.probe("2 clients looping the RLE DICOM", "well-behaved clients keep ≥ 70% of their throughput",
                loaded(files["RLE DICOM 7071², 16-bit"]))


def sigterm(server: Server) -> tuple[str, str, str, str, str]:
    body, headers = multipart(xray_png())
    sock = server.connect()
    sock.sendall(head(f"Content-Length: {len(body)}", KEY, "/v1/predict") + body[:40])
    time.sleep(0.5)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    answer = read_all(sock)
    code = server.proc.wait(timeout=60)
    took = time.monotonic() - t0
    log = server.log_path.read_text()
    result = (f"stalled upload got {answer[9:12].decode()}; exit {code}; "
              f"{log.count('Traceback')} tracebacks, {log.count(' 500 ')} answers 500")
    return ("SIGTERM under a stalled upload", "503 after --grace-seconds (3 s), exit 0, no traceback", result, "", f"{took:.2f} s")


def xray_png() -> bytes:
    from conftest import synthetic_xray  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(synthetic_xray(np.random.default_rng(0), 1, 256)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model.pt or .onnx [the bundled model]")
    parser.add_argument("--seconds", type=float, default=8, help="each throughput window (3 quiet, 3 attacked)")
    parser.add_argument("--out", help="also write the table (with the machine) to this markdown file")
    args = parser.parse_args()
    import resource  # noqa: PLC0415  (1,100 client sockets need more than the usual 1,024)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("making the probe files...", file=sys.stderr)
        files, small = big_files(folder), xray_png()
        server = Server(folder, args.model)
        table = Table(server)
        try:
            probes(server, table, files, small, args.seconds)
            table.rows.append(sigterm(server))
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    text = f"Machine: {machine}\n\n{table.markdown()}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Fault suite (`python benchmarks/faults.py --seconds {args.seconds:g}`)\n\n"
                                  + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
