"""CPU inference speed, each change against its baseline measured in the same run, interleaved.

    python benchmarks/inference.py [--model model.pt] [--data ../shared/data/chest_xray] [--baseline-src ../main/src]

1. ONNX Runtime fp32: the graph as traced, run as before (one session.run per batch, spinning
   threads) vs the simplified graph through today's ``OnnxEngine`` (Pads folded into the
   convolutions, runs of 4, no spinning), at batch 1, 8 and 32 with 1 and 2 threads; PyTorch
   eager beside them. (INT8 was measured here too until it was withdrawn: benchmarks/int8_accuracy.md.)
2. Grad-CAM ms/image: a new model copy and CAM object per call, every parameter trainable (how
   ``compute_cams`` worked before) vs one reused ``CamExplainer``.
3. Cold start of ``pneumoscan predict`` on 1 and 100 images, as subprocesses: the previous code
   (``--baseline-src``, its export cache warm), ``--engine torch``, and the default path (the
   shipped ONNX, no torch).

Variants take turns batch by batch, so a busy machine slows them alike; ratios are the result,
absolute numbers depend on the load (printed). Uses the bundled model unless --model.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from pneumoscan.modeling import artifact
from pneumoscan.evaluation import cams
from pneumoscan.io import imaging
from pneumoscan.core import metrics
from pneumoscan.inference.engines import OnnxEngine
from pneumoscan.inference.onnx_export import export_onnx
from pneumoscan.inference.torch_model import as_batch, predict_logits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
Run = Callable[[np.ndarray], np.ndarray]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def real_files(root: Path, n: int) -> list[Path]:
    """n JPEGs, alternating NORMAL / PNEUMONIA, spread evenly over the train split."""
    per_class = []
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((root / "train" / name).glob("*.jpeg"))
        per_class.append(files[:: max(1, len(files) // (n // 2))][: n // 2])
    return [p for pair in zip(*per_class) for p in pair]


def previous_engine(path: Path, threads: int) -> Run:
    """ONNX Runtime as the engine ran it before: one run per batch, spinning threads on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: metrics.sigmoid(session.run(["logit"], {"image": x[:, None].astype(np.float32) / 255})[0])


def interleaved(runs: dict[str, Run], images: np.ndarray, batch: int, n_images: int) -> dict[str, float]:
    """img/s of each run, the runs taking turns batch by batch."""
    batches = [np.resize(images[(i * batch) % len(images):], (batch, *images.shape[1:]))
               for i in range(max(2, n_images // batch))]
    for run in runs.values():
        run(batches[0])  # warm-up
    total = dict.fromkeys(runs, 0.0)
    for b in batches:
        for name, run in runs.items():
            t = time.perf_counter()
            run(b)
            total[name] += time.perf_counter() - t
    return {name: batch * len(batches) / s for name, s in total.items()}


def ort_section(traced: Path, simple: Path, model, images, n_images: int) -> list[str]:
    lines = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs = {
            "ORT fp32, traced graph, as before (baseline)": previous_engine(traced, threads),
            "ORT fp32, simplified graph, OnnxEngine now": OnnxEngine(simple, threads=threads).predict_proba,
            "PyTorch eager fp32": lambda x: metrics.sigmoid(predict_logits(model, x, batch_size=len(x))),
        }
        reference = runs["PyTorch eager fp32"](images)
        delta = {k: float(np.abs(r(images) - reference).max()) for k, r in runs.items()}
        res = {b: interleaved(runs, images, b, n_images) for b in (1, 8, 32)}
        base = runs_base = next(iter(runs))
        lines += [f"\n#### {threads} thread{'s' * (threads > 1)}: img/s (ratio vs the baseline)\n",
                  "| variant | batch 1 | batch 8 | batch 32 | max abs Δprob vs PyTorch |", "|---|--:|--:|--:|--:|"]
        for name in runs:
            cells = " | ".join(f"{res[b][name]:.1f} ({res[b][name] / res[b][runs_base]:.2f}x)" for b in (1, 8, 32))
            lines.append(f"| {name} | {cells} | {delta[name]:.1e} |")
        del base
        print(f"  ORT section, {threads} threads done", file=sys.stderr)
    return lines


def cam_before(model, architecture: str) -> Run:
    """compute_cams as it was: copy the model, make everything trainable, new CAM object, per call."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def run(images):
        with torch.inference_mode(False), torch.enable_grad():
            net = copy.deepcopy(model).float().eval().requires_grad_(True)
            with cams.METHODS["gradcam"](model=cams._WithClassAxis(net),
                                         target_layers=[cams.cam_layer(net, architecture)]) as cam:
                return cam(input_tensor=as_batch(images), targets=[ClassifierOutputTarget(0)] * len(images))
    return run


def cam_section(model, architecture: str, images: np.ndarray) -> list[str]:
    torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))
    explainer = cams.CamExplainer(model, architecture)
    runs = {"before: copy + CAM object per call, all trainable, torch threads "
            f"{torch.get_num_threads()}": cam_before(model, architecture),
            "CamExplainer reused (1 torch thread, gradients from the CAM layer up)": explainer}
    first = list(runs.values())
    delta = float(np.abs(first[0](images[:8]) - first[1](images[:8])).max())
    lines = ["\n| Grad-CAM | batch 1 ms/image | batch 8 ms/image |", "|---|--:|--:|"]
    res = {b: interleaved(runs, images[:16], b, 16) for b in (1, 8)}
    base = next(iter(runs))
    for name in runs:
        lines.append(f"| {name} | " + " | ".join(f"{1000 / res[b][name]:.0f} ({res[b][name] / res[b][base]:.1f}x)"
                                                  for b in (1, 8)) + " |")
    lines.append(f"\nmax |Δmap| between the two: {delta:.1e}")
    print("  Grad-CAM section done", file=sys.stderr)
    return lines


def cold_start(files: list[Path], work: Path, baseline_src: str | None, reps: int) -> list[str]:
    folder100 = work / "images100"
    folder100.mkdir()
    for i in range(100):
        shutil.copy(files[i % len(files)], folder100 / f"{i:03d}.jpeg")
    src = str(ROOT / "src")
    variants = {"previous code, export cache warm": (baseline_src, []) if baseline_src else None,
                "--engine torch": (src, ["--engine", "torch"]),
                "default: shipped ONNX": (src, [])}
    variants = {k: v for k, v in variants.items() if v}
    env = os.environ | {"PNEUMOSCAN_CACHE_DIR": str(work / "cache")}

    def once(path: str, extra: list[str], target: Path) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", str(target), *extra], check=True,
                       env=env | {"PYTHONPATH": path}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    for path, extra in variants.values():
        once(path, extra, files[0])  # fills the previous code's export cache; page cache warm for all
    times = {(k, n): [] for k in variants for n in (1, 100)}
    for _ in range(reps):
        for n, target in ((1, files[0]), (100, folder100)):
            for k, (path, extra) in variants.items():
                times[(k, n)].append(once(path, extra, target))
    base = next(iter(variants))
    lines = ["\n| `pneumoscan predict` wall time | 1 image | 100 images |", "|---|--:|--:|"]
    for k in variants:
        med = {n: statistics.median(times[(k, n)]) for n in (1, 100)}
        ref = {n: statistics.median(times[(base, n)]) for n in (1, 100)}
        lines.append(f"| {k} | " + " | ".join(f"{med[n]:.2f} s ({ref[n] / med[n]:.1f}x)" for n in (1, 100)) + " |")
    print("  cold start section done", file=sys.stderr)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model.pt [the bundled model]")
    parser.add_argument("--data", default=str(SHARED / "data" / "chest_xray"))
    parser.add_argument("--images", type=int, default=32, help="real images scored")
    parser.add_argument("--n-images", type=int, default=96, help="images timed per variant and batch size")
    parser.add_argument("--baseline-src", help="the previous code's src/ folder, for the cold-start baseline")
    parser.add_argument("--reps", type=int, default=3, help="cold-start repetitions (median)")
    parser.add_argument("--skip", action="append", default=[], choices=["ort", "cam", "cold"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_before = os.getloadavg()[0]
    pt = Path(args.model) if args.model else artifact.BUNDLED_MODEL
    model, meta = artifact.load(pt)
    model.eval()
    files = real_files(Path(args.data), args.images)
    images = np.stack([imaging.load_image(p, meta.image_size) for p in files])
    lines = [f"Model: {pt.name} ({meta.architecture}, {meta.image_size} px); {len(images)} real X-rays. "
             f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} usable CPUs, shared with other jobs "
             f"(load average {load_before:.1f} at start); torch {torch.__version__}, onnxruntime {ort.__version__}."]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        work = Path(tmp)
        if "ort" not in args.skip:
            traced = export_onnx(pt, work / "traced.onnx", simplify=False)
            simple = export_onnx(pt, work / "model.onnx")
            lines += ort_section(traced, simple, model, images, args.n_images)
        if "cam" not in args.skip:
            lines += cam_section(model, meta.architecture, images)
        if "cold" not in args.skip:
            lines += cold_start(files, work, args.baseline_src, args.reps)
    lines.append(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
