"""A claiming worker for the store's concurrency tests, run as its own process.

    python store_worker.py URL WORKER_ID GO_FILE OUT_FILE RECEIVE

Says it is ready (OUT_FILE with suffix .ready), waits for GO_FILE (so that both workers start
together), then claims films two at a time and records a result for each under a model version of
its own, until no film is left; writes the ids it claimed to OUT_FILE. With RECEIVE > 0 it first
records films 0..RECEIVE-1 itself, as the other worker does: a film received twice is one row. A film handed to both workers would therefore carry two results.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from pneumoscan.store import FilmHeader, Store


def film_header(i: int) -> FilmHeader:
    return FilmHeader(study_instance_uid=f"1.2.826.0.1.{i // 3}", sop_instance_uid=f"1.2.826.0.1.{i // 3}.{i}")


def main(url: str, worker: str, go: Path, out: Path, receive: int) -> None:
    sha = hashlib.sha256(worker.encode()).hexdigest()
    with Store.open(url) as store:
        store.register_model(sha, f"worker-{worker}", "1")
        out.with_suffix(".ready").touch()
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(receive):  # both workers receive the same films (a PACS sending to two nodes)
            store.upsert_film(film_header(i), None)
        claimed: list[int] = []
        while films := store.claim_films(worker, limit=2):
            for film in films:
                store.record_result(film.id, sha, probability=0.5, label="NORMAL", threshold=0.5)
                claimed.append(film.id)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(claimed))
    tmp.rename(out)


def run_two_claimers(url: str, folder: Path, n_films: int, *, racing: bool = False) -> tuple[list[int], list[int]]:
    """Fill ``url`` with ``n_films`` waiting films, run two worker processes on it at once, and
    return the ids each claimed (the test checks that they are disjoint and cover every film).
    ``racing``: the workers open the empty database together (both migrate) and both receive
    every film themselves before claiming, instead of finding them there."""
    import os
    import subprocess

    if not racing:
        with Store.open(url) as store:
            for i in range(n_films):
                store.upsert_film(film_header(i), None)
    go = folder / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    receive = str(n_films if racing else 0)
    procs = [subprocess.Popen([sys.executable, __file__, url, name, str(go), str(folder / f"{name}.json"), receive],
                              env=env) for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all((folder / f"{name}.ready").exists() for name in ("a", "b")):  # both connected
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    a, b = (json.loads((folder / f"{name}.json").read_text()) for name in ("a", "b"))
    return a, b


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
