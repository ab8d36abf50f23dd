"""CPU inference speed of the four ways to run a model: PyTorch eager fp32 (the baseline), PyTorch
bf16 autocast + channels-last, ONNX Runtime fp32 and ONNX Runtime INT8.

    python benchmarks/inference.py [--model model.pt] [--data ../shared/data/chest_xray]

Uses the bundled model when there is one, else MobileNetV2 with the shared ImageNet weights and a
random head (speed does not depend on what the head learned). Every variant scores the same real,
already-decoded X-rays (uint8 in, probabilities out, so each one's preprocessing is timed), with a
fixed number of iterations: batch 1 is the service's latency, batch 32 a worklist's throughput.
Prints a markdown table; ratios are against PyTorch eager fp32. Agreement with the baseline
(max |Δ probability|) is printed too: a fast variant that answers differently is not a free win.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from pneumoscan import artifact, export, imaging, metrics, models
from pneumoscan.inference.engines import OnnxEngine, default_threads
from pneumoscan.inference.torch_model import as_batch, predict_logits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_file(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    if args.model:
        return Path(args.model), f"{args.model}"
    if artifact.BUNDLED_MODEL.is_file():
        return artifact.BUNDLED_MODEL, "bundled model"
    weights = Path(args.weights)
    model, info = models.build("mobilenet_v2", weights=str(weights))  # knows the file's normalisation
    model.eval()
    meta = artifact.make_meta(architecture="mobilenet_v2", head="seed", image_size=224, weights_info=info,
                              threshold=0.5, threshold_rule="benchmark", config={})
    return artifact.save(work / "benchmark.pt", model, meta), f"MobileNetV2 ({weights.name}) + random head"


def real_images(root: Path, n: int, size: int) -> np.ndarray:
    """n decoded images, alternating NORMAL / PNEUMONIA, spread evenly over the train split."""
    per_class = []
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((root / "train" / name).glob("*.jpeg"))
        per_class.append(files[:: max(1, len(files) // (n // 2))][: n // 2])
    return np.stack([imaging.load_image(p, size) for pair in zip(*per_class) for p in pair])


def torch_bf16(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    fast = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        x = as_batch(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return metrics.sigmoid(fast(x).float().numpy())

    return run


def scorer(engine: OnnxEngine) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: engine.predict_proba(images, batch_size=len(images))


def timings(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int, iters: int) -> dict:
    batches = [images[(i * batch) % len(images):][:batch] for i in range(iters)]
    batches = [b if len(b) == batch else images[:batch] for b in batches]
    for b in batches[:2]:
        run(b)  # warm-up: allocator, oneDNN primitive caches, ORT's first-run planning
    seconds = []
    for b in batches:
        t = time.perf_counter()
        run(b)
        seconds.append(time.perf_counter() - t)
    s = np.array(seconds)
    return {"ips": batch * iters / s.sum(), "p50": 1000 * np.percentile(s, 50), "p95": 1000 * np.percentile(s, 95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model.pt or .onnx [bundled, else shared weights + random head]")
    parser.add_argument("--data", default=str(SHARED / "data" / "chest_xray"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet.pth"))
    parser.add_argument("--images", type=int, default=48, help="real images scored")
    parser.add_argument("--calibration", type=int, default=32, help="other real images for INT8 calibration")
    parser.add_argument("--iters-1", type=int, default=60, help="timed batch-1 calls per variant")
    parser.add_argument("--iters-32", type=int, default=6, help="timed batch-32 calls per variant")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for both runtimes (1 is steadier on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        work = Path(tmp)
        pt, described = model_file(args, work)
        model, meta = artifact.load(pt)
        size = meta.image_size
        decoded = real_images(Path(args.data), args.images + args.calibration, size)
        images, calibration = decoded[: args.images], decoded[args.images:]

        t = time.perf_counter()
        fp32 = export.export_onnx(pt, work / "model.onnx")
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        int8 = export.quantize_onnx(fp32, work / "model.int8.onnx", calibration)
        quantize_s = time.perf_counter() - t

        variants: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "PyTorch eager fp32": lambda x: metrics.sigmoid(predict_logits(model, x, batch_size=len(x))),
            "PyTorch bf16 autocast + channels-last": torch_bf16(model),
            "ONNX Runtime fp32": scorer(OnnxEngine(fp32, threads=args.threads)),
            "ONNX Runtime INT8 (static QDQ, U8S8)": scorer(OnnxEngine(int8, threads=args.threads)),
        }
        reference = variants["PyTorch eager fp32"](images)
        results = {}
        t_all = time.perf_counter()
        for name, run in variants.items():
            results[name] = {
                "b1": timings(run, images, 1, args.iters_1),
                "b32": timings(run, images, 32, args.iters_32),
                "delta": float(np.abs(run(images) - reference).max()),
            }
            print(f"  measured {name}", file=sys.stderr)
        bench_s = time.perf_counter() - t_all

    base = results["PyTorch eager fp32"]
    lines = [
        f"Model: {described}, input {size}x{size}; {len(images)} real X-rays from {Path(args.data).name}; "
        f"{args.iters_1} batch-1 and {args.iters_32} batch-32 timed calls per variant after 2 warm-up calls.",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"load average {load_before:.1f} at start; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {ort.__version__} ({args.threads} intra-op threads), Python {platform.python_version()}.",
        f"Export {export_s:.1f} s, INT8 calibration on {len(calibration)} other images {quantize_s:.1f} s, "
        f"timing {bench_s:.0f} s.",
        "",
        "| variant | batch 1 img/s | p50 ms | p95 ms | batch 32 img/s | p50 ms/batch | p95 ms/batch "
        "| speed-up b1 | speed-up b32 | max abs Δprob vs fp32 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        b1, b32 = r["b1"], r["b32"]
        lines.append(
            f"| {name} | {b1['ips']:.1f} | {b1['p50']:.1f} | {b1['p95']:.1f} | {b32['ips']:.1f} | {b32['p50']:.0f} "
            f"| {b32['p95']:.0f} | {b1['ips'] / base['b1']['ips']:.2f}x | {b32['ips'] / base['b32']['ips']:.2f}x "
            f"| {r['delta']:.1e} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
