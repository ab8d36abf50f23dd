"""``pneumoscan node`` latency and burst throughput, beside ``pneumoscan predict`` on the same films.

Starts the node as a process on free ports (the bundled model, a SQLite store in a temp folder),
with this process as both the modality (pynetdicom SCU, and DCMTK's ``storescu`` for the burst)
and the PACS that receives the SRs (pynetdicom SCP, arrival times taken on receipt).

* latency: ``--latency-studies`` one-film studies sent one after another; for each, the time from
  the C-STORE success of its (last) instance to its SR's arrival, minus ``--stable-seconds``;
  p50 / p95 over the studies.
* burst: ``--burst`` one-film studies sent by one ``storescu`` at full speed; films/s from the
  first send to the last SR (with and without the one stable wait), every SR counted, and the
  store asked whether every film has a result; then ``pneumoscan predict`` on the same files
  (CLI wall time, model start included).

    python benchmarks/node_latency.py                       # 20 latency studies, burst of 100
    python benchmarks/node_latency.py --burst 500           # the issue's burst (slow on 2 cores)

Films: the repo's sample JPEGs (examples/chest_xray_sample) at their own size, wrapped as DX
DICOMs by tests/dicom_films.py; the PNEUMONIA and NORMAL ones cycled.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]
from dicom_films import chest_film, sample_jpegs, save  # noqa: E402
from orthanc_procs import NodeProcess  # noqa: E402


class Pacs:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}  # source SOP Instance UID -> arrival (perf_counter)
        self.lock = threading.Lock()
        ae = AE("BENCHPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)])
        self.port = self.server.server_address[1]

    def store(self, event) -> int:
        now = time.perf_counter()
        ds = event.dataset
        ev = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        with self.lock:
            self.arrived[ev.ReferencedSOPInstanceUID] = now
        return 0

    def wait(self, uids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(u in self.arrived for u in uids):
                    return True
            time.sleep(0.01)
        return False


def make_films(folder: Path, n: int) -> list[Path]:
    jpegs = [p for pair in zip(sample_jpegs(100, "PNEUMONIA"), sample_jpegs(100, "NORMAL")) for p in pair]
    return [save(chest_film(jpegs[i % len(jpegs)], size=None), folder / f"{i:04d}.dcm") for i in range(n)]


def send_one(port: int, path: Path) -> float:
    import pydicom

    ds = pydicom.dcmread(path)
    ae = AE("BENCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    status = assoc.send_c_store(ds)
    done = time.perf_counter()
    assoc.release()
    assert status.Status == 0, hex(status.Status)
    return done


def uid_of(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def latency(node: NodeProcess, pacs: Pacs, films: list[Path], stable: float) -> list[float]:
    out = []
    for path in films:
        uid = uid_of(path)
        sent = send_one(node.port, path)
        if not pacs.wait([uid], 120):
            raise SystemExit("an SR never arrived")
        out.append(pacs.arrived[uid] - sent - stable)
    return out


def burst(node: NodeProcess, pacs: Pacs, films: list[Path], stable: float) -> dict:
    uids = [uid_of(p) for p in films]
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(node.port), *map(str, films)], check=True,
                   capture_output=True)
    sent = time.perf_counter()
    complete = pacs.wait(uids, 60 + 5 * len(films))
    last = max(pacs.arrived.get(u, 0.0) for u in uids)
    from pneumoscan.store import Store

    with Store.open(node.db) as store:
        scored = sum(1 for s in store.list_studies(limit=10_000) if s.state == "scored")
    return {"n": len(films), "send_s": sent - t0, "total_s": last - t0, "complete": complete,
            "srs": sum(u in pacs.arrived for u in uids), "scored_in_store": scored, "stable": stable}


def predict_rate(films: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", *map(str, films), "--out",
                    str(films[0].parent / "predict.csv")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return len(films) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-studies", type=int, default=20)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs = Pacs()
        films = make_films(work / "lat", args.latency_studies)
        burst_films = make_films(work / "burst", args.burst)
        node = NodeProcess(work / "node", "--send-to", f"BENCHPACS@127.0.0.1:{pacs.port}", "--stable-seconds",
                           str(args.stable_seconds))
        try:
            send_one(node.port, films[0])  # warm-up study (first scoring loads lazily)
            pacs.wait([uid_of(films[0])], 120)
            lat = np.array(latency(node, pacs, films[1:], args.stable_seconds)) * 1000
            b = burst(node, pacs, burst_films, args.stable_seconds)
            b["expected_studies"] = len(films) + len(burst_films)
        finally:
            node.close()
        rate = predict_rate(burst_films)
    cpus = os.cpu_count()
    print(f"## pneumoscan node: latency and burst ({platform.machine()}, {cpus} CPUs, Python {platform.python_version()})\n")
    print(f"latency, last instance acknowledged -> SR received, --stable-seconds {args.stable_seconds:g} subtracted, "
          f"{len(lat)} one-film studies: p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, "
          f"max {lat.max():.0f} ms\n")
    node_rate = b["n"] / b["total_s"]
    node_rate_ex = b["n"] / max(1e-9, b["total_s"] - b["stable"])
    print("| burst | films | sent in | all SRs after | films/s | films/s without the stable wait | SRs received | "
          "studies scored in store | `pneumoscan predict` films/s (CLI, start included) |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --: |")
    print(f"| storescu, one association | {b['n']} | {b['send_s']:.1f} s | {b['total_s']:.1f} s | {node_rate:.1f} | "
          f"{node_rate_ex:.1f} | {b['srs']} | {b['scored_in_store']} of {b['expected_studies']} | {rate:.1f} |")


if __name__ == "__main__":
    main()
