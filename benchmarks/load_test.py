"""Load test of ``pneumoscan serve``: N concurrent clients posting real X-rays to /v1/predict.

Starts the server in its own process on 127.0.0.1 (and only there), warms it up, then runs
``--clients`` concurrent clients for ``--duration`` seconds, each posting one of a few dozen
JPEGs from ../shared/data, and prints throughput, latency percentiles and errors as a markdown
table. Bounded: it stops at the deadline or after ``--max-requests``, whichever comes first.

    python benchmarks/load_test.py                      # bundled model, else an untrained one
    python benchmarks/load_test.py --model runs/X/model.pt --clients 32 --duration 30
    python benchmarks/load_test.py --micro-batch 1            # the queue without batching
    python benchmarks/load_test.py --src ../main/src          # another checkout's server (a baseline)
    python benchmarks/load_test.py --default-model --clients 1 8 32 --duration 15 \
        --baseline-src ../base/src                            # one table: baseline, batching off, on

The server's output goes to a log file in the work folder (printed on failure): a pipe nobody
reads fills after ~1,000 access-log lines and then blocks the server.

Without --model and without a bundled model it saves an *untrained* MobileNetV2 at 224 px: its
scores mean nothing, but it costs exactly what a trained one costs, which is what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "chest_xray" / "train"


def untrained_model(path: Path, size: int = 224) -> Path:
    """Made once and kept: the engine caches its ONNX export by the file's sha256, and a re-saved
    model gets a new sha256 (torch.save records the temporary file's name), so reuse the file."""
    if path.is_file():
        return path
    from pneumoscan.modeling import artifact, models

    model, info = models.build("mobilenet_v2", weights="none")
    meta = artifact.make_meta(architecture="mobilenet_v2", head="seed", image_size=size, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={}, extra={"note": "untrained, for load tests"})
    return artifact.save(path, model.eval(), meta)


def pick_model(given: str | None) -> tuple[Path, str]:
    from pneumoscan.modeling import artifact

    if given:
        return Path(given), f"{given} (given)"
    if artifact.BUNDLED_MODEL.is_file():
        return artifact.BUNDLED_MODEL, "bundled model"
    from pneumoscan.inference.loading import cache_dir

    path = untrained_model(cache_dir() / "benchmarks" / "untrained_mobilenet_v2_224.pt")
    return path, "untrained MobileNetV2, 224 px (no bundled model)"


def pick_images(data: Path, n: int) -> list[tuple[str, bytes]]:
    """n JPEGs, half from each class, spread evenly over the sorted file lists (deterministic)."""
    files: list[Path] = []
    for cls in ("NORMAL", "PNEUMONIA"):
        found = sorted((data / cls).glob("*.jpeg"))
        if not found:
            sys.exit(f"load_test: no JPEGs in {data / cls}; pass --data")
        files += [found[i] for i in np.linspace(0, len(found) - 1, n // 2).astype(int)]
    return [(f.name, f.read_bytes()) for f in files]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path | None, port: int, engine: str, log_path: Path, extra: list[str],
                 src: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pneumoscan.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--engine", engine, *(["--model", str(model)] if model else []), *extra]
    env = os.environ | {"PNEUMOSCAN_API_KEY": ""} | ({"PYTHONPATH": src} if src else {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)


def log_tail(log_path: Path, n: int = 2000) -> str:
    return log_path.read_text(errors="replace")[-n:] if log_path.is_file() else "(no log)"


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_test: the server exited ({proc.returncode}); {log_path}:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{base}/v1/health", timeout=2).json().get("model_loaded"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    sys.exit(f"load_test: the server did not become ready; {log_path}:\n{log_tail(log_path)}")


async def run_load(base: str, images: list[tuple[str, bytes]], clients: int, duration: float,
                   max_requests: int, explain: bool) -> tuple[list[float], Counter, float]:
    latencies: list[float] = []
    errors: Counter = Counter()  # "HTTP 503", "ReadTimeout", ...
    sent = 0
    url = f"{base}/v1/predict" + ("?explain=true" if explain else "")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        # warm-up: first calls pay for lazy initialisation, which is not steady-state cost
        for name, blob in images[:4]:
            (await client.post(url, files={"file": (name, blob)})).raise_for_status()

        started = time.perf_counter()
        deadline = started + duration

        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                name, blob = images[i % len(images)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, files={"file": (name, blob)})
                    outcome = "ok" if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if outcome == "ok":
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[outcome] += 1

        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def report(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def measure(args, images, model, clients: int, *, src: str | None, micro_batch: int | None,
            default_model: bool) -> dict:
    """One server started, loaded with ``clients`` clients for ``args.duration`` s, stopped."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(args.work) / f"server-{port}.log"
    extra = ["--micro-batch", str(micro_batch)] if micro_batch else []
    proc = start_server(None if default_model else model, port, args.engine, log_path, extra, src)
    try:
        wait_ready(base, proc, log_path)
        card = httpx.get(f"{base}/v1/model", timeout=10).json()
        latencies, errors, elapsed = asyncio.run(
            run_load(base, images, clients, args.duration, args.max_requests, args.explain))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if errors:
        print(f"\nserver log {log_path}:\n{log_tail(log_path)}", file=sys.stderr)
    ms = np.array(latencies) * 1000
    return {"card": card, "ok": len(latencies), "errors": errors, "elapsed": elapsed,
            "rate": len(latencies) / elapsed, **{f"p{q}": float(np.percentile(ms, q)) if len(ms) else float("nan")
                                                 for q in (50, 95, 99)}}


def cell(r: dict, base: dict | None = None) -> str:
    ratio = f" ({r['rate'] / base['rate']:.1f}×)" if base else ""
    errors = f", {sum(r['errors'].values())} errors" if r["errors"] else ""
    return f"{r['rate']:.1f}{ratio}, {r['p50']:.0f} / {r['p99']:.0f}{errors}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model.pt or .onnx [bundled, else an untrained MobileNetV2]")
    p.add_argument("--data", default=str(SHARED_TRAIN), help="folder with NORMAL/ and PNEUMONIA/ JPEGs")
    p.add_argument("--images", type=int, default=48, help="distinct X-rays to cycle through")
    p.add_argument("--clients", type=int, nargs="+", default=[32], help="one or more client counts")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    p.add_argument("--max-requests", type=int, default=100_000, help="hard bound on requests sent")
    p.add_argument("--engine", choices=["auto", "onnx", "torch"], default="auto")
    p.add_argument("--explain", action="store_true", help="ask for Grad-CAM overlays too")
    p.add_argument("--micro-batch", type=int, help="the server's --micro-batch (1: no batching) [its default]")
    p.add_argument("--src", help="PYTHONPATH for the server: another checkout's src/, e.g. a baseline")
    p.add_argument("--baseline-src", help="another checkout's src/ to measure first at each client count, with "
                                          "its own bundled model; then this checkout batching off and on")
    p.add_argument("--default-model", action="store_true",
                   help="start the server without --model (the bundled model as users get it)")
    p.add_argument("--work", default=str(REPO / "runs" / "load_test"), help="folder for the server's log")
    args = p.parse_args(argv)

    images = pick_images(Path(args.data), args.images)
    model, model_desc = pick_model(args.model)
    machine = f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}"
    if args.baseline_src:
        print("## pneumoscan serve load test against a baseline\n")
        print(f"req/s (× baseline), latency p50 / p99 ms; {args.duration:g} s per cell, {len(images)} JPEGs, "
              f"{machine}\n")
        print("| clients | baseline | now, batching off | now, default batching |")
        print("| --: | --: | --: | --: |")
        failed = False
        for clients in args.clients:
            base = measure(args, images, model, clients, src=args.baseline_src, micro_batch=None, default_model=True)
            off = measure(args, images, model, clients, src=args.src, micro_batch=1,
                          default_model=args.default_model)
            on = measure(args, images, model, clients, src=args.src, micro_batch=args.micro_batch,
                         default_model=args.default_model)
            failed |= any(r["errors"] for r in (base, off, on))
            print(f"| {clients} | {cell(base)} | {cell(off, base)} | {cell(on, base)} |", flush=True)
        print(f"\nbaseline: {args.baseline_src} ({base['card']['architecture']}); now: {model_desc} "
              f"({on['card']['architecture']}, runtime {on['card']['runtime']})")
        return 1 if failed else 0

    failed = False
    for clients in args.clients:
        r = measure(args, images, model, clients, src=args.src, micro_batch=args.micro_batch,
                    default_model=args.default_model)
        card = r["card"]
        pct = {q: f"{r[f'p{q}']:.0f} ms" if r["ok"] else "n/a" for q in (50, 95, 99)}
        print("## pneumoscan serve load test\n")
        print(report([
            ("model", f"{model_desc}: {card['architecture']}, {card['image_size']} px, runtime {card['runtime']}"),
            ("endpoint", "POST /v1/predict" + ("?explain=true" if args.explain else "")),
            ("images", f"{len(images)} JPEGs from {args.data}"),
            ("clients", str(clients)),
            ("duration", f"{r['elapsed']:.1f} s"),
            ("requests ok", str(r["ok"])),
            ("errors", str(sum(r["errors"].values())) + (f" ({', '.join(f'{k}: {v}' for k, v in r['errors'].items())})"
                                                         if r["errors"] else "")),
            ("throughput", f"{r['rate']:.1f} req/s"),
            ("latency p50", pct[50]),
            ("latency p95", pct[95]),
            ("latency p99", pct[99]),
            ("machine", machine),
        ]))
        failed |= bool(r["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
