"""How far post-training INT8 moves the bundled model's answers, per quantisation variant.

The service's 3x throughput target (issue 13) needs about twice fp32's images per second on two
cores, which only INT8 gives; this measures what it costs in probabilities, labels and OOD
distances before anyone makes it a default.

    python benchmarks/int8_accuracy.py                # bundled model.onnx, films from ../shared

Calibration: every 2nd of the chosen films (at most 80); comparison: all of them (165 by default,
every 20th NORMAL and 40th PNEUMONIA of the training split, so they were in the model's training
data: this measures agreement with fp32, not accuracy). Speed: img/s on 64 films at the engine's
thread count, fp32 timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "chest_xray" / "train"
NOT_BACKBONE = ("MatMul", "Gemm", "Pow", "ReduceSum", "ReduceMin", "ReduceL2", "Div", "Sub",
                "BatchNormalization", "Relu")  # heads and the OOD distance after the pooled features


def films(root: Path, size: int) -> np.ndarray:
    from pneumoscan.io import data

    paths = sorted((root / "NORMAL").glob("*.jpeg"))[::20] + sorted((root / "PNEUMONIA").glob("*.jpeg"))[::40]
    samples = [data.Sample(str(p), int("PNEUMONIA" in str(p)), p.stem, "test") for p in paths]
    return data.load_images(samples, size)[1]


def variants(proto: onnx.ModelProto) -> dict[str, dict]:
    from onnxruntime.quantization import CalibrationMethod

    from pneumoscan.commands.export import after_pooling

    heads = [n.name for n in proto.graph.node if n.op_type in NOT_BACKBONE]
    return {
        "pooled features onwards in fp32, 7-bit weights (pneumoscan export --int8)":
            {"reduce_range": True, "nodes_to_exclude": after_pooling(proto)},
        "all nodes, 7-bit weights (export --int8 before issue 20)": {"reduce_range": True},
        "backbone only, 7-bit weights": {"reduce_range": True, "nodes_to_exclude": heads},
        "backbone only, 8-bit weights (saturates without VNNI)": {"reduce_range": False, "nodes_to_exclude": heads},
        "backbone only, 7-bit, percentile 99.99": {"reduce_range": True, "nodes_to_exclude": heads,
                                                    "calibrate_method": CalibrationMethod.Percentile,
                                                    "extra_options": {"CalibPercentile": 99.99}},
    }


def ood_flags(meta, scores: np.ndarray) -> np.ndarray:
    """0 none, 1 out_of_distribution, 2 not_chest_xray, from the model's cut-offs."""
    from pneumoscan.safety.decision import NOT_CHEST, OUT_OF_DISTRIBUTION, ood_flag

    codes = {None: 0, OUT_OF_DISTRIBUTION: 1, NOT_CHEST: 2}
    return np.array([codes[ood_flag(meta, float(s))] for s in scores])


def main(argv=None) -> int:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pneumoscan.core import metrics
    from pneumoscan.inference.engines import OnnxEngine
    from pneumoscan.inference.loading import BUNDLED_ONNX

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=BUNDLED_ONNX, help="an fp32 .onnx [the bundled model's]")
    p.add_argument("--data", type=Path, default=SHARED_TRAIN)
    args = p.parse_args(argv)

    fp32 = OnnxEngine(args.model)
    images = films(args.data, fp32.meta.image_size)
    calibration = images[::2][:80]
    ref_logit, ref_ood = fp32.assess(images)
    ref = metrics.sigmoid(ref_logit)
    threshold = fp32.meta.threshold

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": (calibration[i:i + 8, None] / 255).astype(np.float32)}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    def speed(engine) -> float:
        x = images[:64]
        engine.assess(x[:8])
        started = time.perf_counter()
        engine.assess(x)
        return 64 / (time.perf_counter() - started)

    print(f"## INT8 against fp32: {args.model.name}, {len(images)} films, threshold {threshold:.3f}\n")
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.processor() or 'cpu'}), "
          f"{fp32.session.get_session_options().intra_op_num_threads} ORT threads\n")
    print("| variant | max Δprob | mean Δprob | labels changed | median OOD Δ (relative) | OOD flags changed | INT8 img/s | fp32 img/s |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(args.model), str(prepared), skip_symbolic_shape=True)
        for name, options in variants(onnx.load(prepared)).items():
            out = Path(work) / "int8.onnx"
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **options)
            int8 = OnnxEngine(out)
            logit, ood = int8.assess(images)
            prob = metrics.sigmoid(logit)
            flips = int(((prob >= threshold) != (ref >= threshold)).sum())
            ood_delta = float(np.median(np.abs(ood - ref_ood) / np.abs(ref_ood))) if np.isfinite(ref_ood).all() else float("nan")
            ood_flips = int((ood_flags(fp32.meta, ood) != ood_flags(fp32.meta, ref_ood)).sum())
            print(f"| {name} | {np.abs(prob - ref).max():.3f} | {np.abs(prob - ref).mean():.4f} | {flips} of {len(images)} | "
                  f"{ood_delta:.2f} | {ood_flips} of {len(images)} | {speed(int8):.0f} | {speed(fp32):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
