"""How far post-training INT8 moves the bundled model's answers, per quantisation variant.

This is the measurement behind withdrawing ``pneumoscan export --int8`` (benchmarks/int8_accuracy.md):
no variant keeps the final labels (PNEUMONIA / NORMAL / UNSURE / NOT_ASSESSED, from
``safety.decision``) of 99% of the films and mean |Δprob| <= 0.02 while running faster than fp32.
It carries its own quantisation code, since the package no longer has any.

    python benchmarks/int8_accuracy.py                      # every variant, bundled model.onnx
    python benchmarks/int8_accuracy.py --variant u8s8-7bit  # one (repeatable)

Films: every 20th NORMAL and 40th PNEUMONIA of the training split (165), so they were in the
model's training data: this measures agreement with fp32, not accuracy. Calibration: every 2nd of
them (at most 80), or 256 other training films (variant ``more-calibration``); "held-out" counts
only the films not used for calibration. Final labels come from ``safety.decision.decide`` with
the model's threshold, UNSURE band, OOD cut-offs and chest-film detector (no image fails the
quality gate, which reads the image, not the model). Speed: fp32 and INT8 take turns on 32 films,
3 rounds, at the engine's thread count; the ratio is the result, absolute img/s depend on the load.
"Simulated" rows run the INT8 file with ONNX Runtime's graph optimisations off, so each quantised
convolution runs as DequantizeLinear -> fp32 Conv -> QuantizeLinear: the exact answers of integer
kernels that do not saturate (a VNNI CPU's), with no speed to report.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "chest_xray" / "train"
TOLERANCE = {"labels": 0.01, "mean_dprob": 0.02}  # issue 20's criterion


def films(root: Path, size: int, offsets: tuple[int, ...] = (0,)) -> np.ndarray:
    """Every 20th NORMAL and 40th PNEUMONIA film, starting at each of ``offsets``/20 (/40)."""
    from pneumoscan.io import data

    normal, pneumonia = sorted((root / "NORMAL").glob("*.jpeg")), sorted((root / "PNEUMONIA").glob("*.jpeg"))
    paths = [p for i, p in enumerate(normal) if i % 20 in offsets]
    paths += [p for i, p in enumerate(pneumonia) if i % 40 in {2 * o for o in offsets}]
    samples = [data.Sample(str(p), int("PNEUMONIA" in str(p)), p.stem, "test") for p in paths]
    return data.load_images(samples, size)[1]


# ----------------------------------------------------------------------------- which nodes stay fp32


def after_pooling(proto: onnx.ModelProto) -> list[str]:
    """``GlobalAveragePool`` and everything downstream: heads, ensemble mean, temperature, OOD
    distance and chest-film detector. Quantised, the members' raw logits (thousands) share one
    uint8 scale and every answer collapses to ~0.5 (the defect of issue 20), so every variant
    below keeps them fp32."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    frontier = [n for n in proto.graph.node if n.op_type == "GlobalAveragePool"]
    while frontier:
        node = frontier.pop()
        if node.name not in found:
            found[node.name] = None
            frontier.extend(c for out in node.output for c in consumers.get(out, []))
    return list(found)


def depthwise(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def projections(proto: onnx.ModelProto) -> list[str]:
    """The linear-bottleneck 1x1 convolutions (no ReLU6 after them) and the residual Adds they feed:
    where the per-layer error jumps (see the .md)."""
    clipped = {n.input[0] for n in proto.graph.node if n.op_type == "Clip"}
    return ([n.name for n in proto.graph.node if n.op_type == "Conv" and n.output[0] not in clipped]
            + [n.name for n in proto.graph.node if n.op_type == "Add" and "features" in n.name])


def last_convs(proto: onnx.ModelProto) -> list[str]:
    """The 1x1 convolution right before each pooling, and its ReLU6."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    names = []
    for pool in (n for n in proto.graph.node if n.op_type == "GlobalAveragePool"):
        node = producer[pool.input[0]]
        while node.op_type != "Conv":
            names.append(node.name)
            node = producer[node.input[0]]
        names.append(node.name)
    return names


def variants() -> dict[str, dict]:
    """name -> quantize_static options (``fp32`` names extra node groups kept fp32)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    u8s8_7 = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": True}
    u8s8_8 = u8s8_7 | {"reduce_range": False}
    return {
        "u8s8-7bit (export --int8 as it was)": u8s8_7,
        "u8s8-7bit, depthwise convs fp32": u8s8_7 | {"fp32": ("depthwise",)},
        "u8s8-7bit, last 1x1 conv before pooling fp32": u8s8_7 | {"fp32": ("last",)},
        "u8s8-7bit, projection convs + residual adds fp32": u8s8_7 | {"fp32": ("projections",)},
        "u8s8-7bit, percentile 99.99": u8s8_7 | {"calibrate_method": CalibrationMethod.Percentile,
                                                  "extra_options": {"CalibPercentile": 99.99}},
        "u8s8-7bit, 256 other calibration films": u8s8_7 | {"calibration": "more"},
        "u8s8-7bit, per-tensor weights": u8s8_7 | {"per_channel": False},
        "u8s8-8bit (saturates without VNNI)": u8s8_8,
        "u8s8-8bit, simulated (no saturation: a VNNI CPU)": u8s8_8 | {"simulate": True},
        "u8s8-8bit, depthwise fp32, simulated": u8s8_8 | {"simulate": True, "fp32": ("depthwise",)},
        "u8s8-8bit, x64quantprecision (u8u8 kernels, no saturation)": u8s8_8 | {"precise": True},
        "u8s8-8bit, depthwise fp32, x64quantprecision": u8s8_8 | {"precise": True, "fp32": ("depthwise",)},
        "s8s8-8bit": u8s8_8 | {"activation_type": QuantType.QInt8},
        "u8u8-8bit (asymmetric weights)": u8s8_8 | {"weight_type": QuantType.QUInt8},
    }


KEPT = {"depthwise": depthwise, "projections": projections, "last": last_convs}


# ----------------------------------------------------------------------------- measuring


def quantize(prepared: Path, out: Path, calibration: np.ndarray, options: dict) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from pneumoscan.inference.batching import unit_interval

    class Reader:
        def __init__(self):
            self.batches = iter([{"image": unit_interval(calibration[i:i + 8])} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    proto = onnx.load(prepared)
    options = {k: v for k, v in options.items() if k not in ("simulate", "precise", "calibration", "fp32")} | {
        "nodes_to_exclude": list(dict.fromkeys(after_pooling(proto) + sum(
            (KEPT[g](proto) for g in options.get("fp32", ())), [])))}
    options.setdefault("per_channel", True)
    options.setdefault("calibrate_method", CalibrationMethod.MinMax)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, **options)
    return out


def engine(path: Path, simulate: bool = False, precise: bool = False):
    """The INT8 file's ``OnnxEngine``; ``simulate``: graph optimisations off (see the docstring);
    ``precise``: ORT's ``session.x64quantprecision`` (u8u8 kernels instead of saturating u8s8 on
    x86 CPUs without VNNI)."""
    from pneumoscan.inference.engines import OnnxEngine

    e = OnnxEngine(path)
    if simulate or precise:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = e.session.get_session_options().intra_op_num_threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if simulate:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if precise:
            so.add_session_config_entry("session.x64quantprecision", "1")
        e.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return e


def verdicts(meta, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(final labels, probabilities, OOD flags, chest flags) as ``safety.decision`` gives them."""
    from pneumoscan.safety import chest, decision

    logits, ood, chest_logits = scores
    v = decision.decide(meta, logits, ood, [[] for _ in logits], chest_logits=chest_logits)
    return (np.array([x.label for x in v]), np.array([x.probability for x in v]),
            np.array([str(decision.ood_flag(meta, float(s))) for s in ood]),
            np.array([str(chest.is_chest(meta.chest, float(c))) for c in chest_logits]))


def speed_ratio(fp32, int8, images: np.ndarray, rounds: int = 3) -> tuple[float, float]:
    """(INT8 img/s, fp32 img/s), taking turns so a busy machine slows both alike."""
    spent = {"fp32": 0.0, "int8": 0.0}
    fp32.assess(images[:4]), int8.assess(images[:4])
    for _ in range(rounds):
        for name, e in (("fp32", fp32), ("int8", int8)):
            started = time.perf_counter()
            e.assess(images)
            spent[name] += time.perf_counter() - started
    return rounds * len(images) / spent["int8"], rounds * len(images) / spent["fp32"]


def row(name: str, ref, got, held: np.ndarray, speed: tuple[float, float] | None) -> str:
    (l32, p32, o32, c32), (l8, p8, o8, c8) = ref, got
    n = len(l32)
    dp = np.abs(p8 - p32)
    changed = l8 != l32
    ok = changed.sum() <= TOLERANCE["labels"] * n and dp.mean() <= TOLERANCE["mean_dprob"] and (speed or (0, 1))[0] > (speed or (0, 1))[1]
    cells = [name, f"{changed.sum()} of {n}", f"{changed[held].sum()} of {held.sum()}", f"{dp.mean():.4f}",
             f"{dp.max():.3f}", f"{(o8 != o32).sum()}", f"{(c8 != c32).sum()}",
             f"{speed[0]:.0f} / {speed[1]:.0f} = {speed[0] / speed[1]:.2f}x" if speed else "simulated",
             "yes" if ok else "no"]
    return "| " + " | ".join(cells) + " |"


def machine() -> str:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else \
        "AVX2, no VNNI" if "avx2" in flags else "no AVX2"
    return (f"{model} ({isa}), {len(os.sched_getaffinity(0))} usable CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at start")


def main(argv=None) -> int:
    import onnxruntime
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pneumoscan.inference.loading import BUNDLED_ONNX

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=BUNDLED_ONNX, help="an fp32 .onnx [the bundled model's]")
    p.add_argument("--data", type=Path, default=SHARED_TRAIN)
    p.add_argument("--variant", action="append", choices=list(variants()), help="only these [all]")
    args = p.parse_args(argv)

    fp32 = engine(args.model)
    images = films(args.data, fp32.meta.image_size)
    ref = verdicts(fp32.meta, fp32.score_all(images))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"Stamp: `python benchmarks/int8_accuracy.py {shlex.join(argv or sys.argv[1:])}`, commit {commit}, "
          f"onnxruntime {onnxruntime.__version__}, {fp32.session.get_session_options().intra_op_num_threads} ORT "
          f"threads; machine: {machine()}. {args.model.name}, {len(images)} films; fp32 labels: "
          + ", ".join(f"{k} {int((ref[0] == k).sum())}" for k in sorted(set(ref[0]))) + "\n")
    print("| variant | final labels changed | of them held-out | mean Δprob | max Δprob | OOD flags changed "
          "| chest flags changed | INT8 / fp32 img/s | within criterion and faster |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --- |")
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(args.model), str(prepared), skip_symbolic_shape=True)
        more = None
        for name in args.variant or variants():
            options = variants()[name]
            if options.get("calibration") == "more":
                more = films(args.data, fp32.meta.image_size, offsets=(5, 10, 15))[::2][:256] if more is None else more
                calibration, held = more, np.ones(len(images), bool)
            else:
                calibration, held = images[::2][:80], np.arange(len(images)) % 2 == 1
            int8 = engine(quantize(prepared, Path(work) / "int8.onnx", calibration, options), options.get("simulate", False),
                          options.get("precise", False))
            got = verdicts(fp32.meta, int8.score_all(images))
            speed = None if options.get("simulate") else speed_ratio(fp32, int8, images[:32])
            print(row(name, ref, got, held, speed), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
