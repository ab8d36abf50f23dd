"""``pneumoscan export``: the checked ONNX export, and static INT8 quantisation checked on ROC-AUC.

The fp32 export itself is ``inference.onnx_export.export_onnx`` (the engines export a
``model.pt`` on first use through it too); this module adds what only the export command does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from pneumoscan.io import data
from pneumoscan.core import metrics
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path, file_sha256
from pneumoscan.inference.batching import spans, unit_interval
from pneumoscan.inference.engines import OnnxEngine
from pneumoscan.inference.onnx_export import export_onnx
from pneumoscan.inference.onnx_format import (INPUT_NAME, SELFCHECK_KEY, SELFCHECK_TOLERANCE, encode_selfcheck,
                                              get_document, set_document)

__all__ = ["export_onnx", "quantize_onnx", "quantize_checked", "compare_auc"]

log = logging.getLogger(__name__)

INT8_AUC_TOLERANCE = 0.005  # max |ROC-AUC int8 - ROC-AUC fp32| for an INT8 model to be kept
# and the answers themselves must agree on the held-out films (issue 20's criterion): at most this
# share of labels (at the model's threshold) or of OOD flags changed, and this mean |Δprob|
INT8_MAX_CHANGED = 0.01
INT8_MAX_MEAN_PROB_DELTA = 0.02
SELFCHECK_IMAGES = 8  # reference images stored in an INT8 file, scored again at every load


# ----------------------------------------------------------------------------- INT8


class _CalibrationReader:
    """Feeds calibration batches to ONNX Runtime's calibrator (its CalibrationDataReader protocol)."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self.images, self.batch_size = images, batch_size
        self._batches: Iterator[dict] | None = None
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = ({INPUT_NAME: unit_interval(self.images[s])} for s in spans(len(self.images), self.batch_size))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def after_pooling(proto: onnx.ModelProto) -> list[str]:
    """The nodes that read the pooled features (``GlobalAveragePool`` and everything downstream of
    it): the heads, the ensemble's mean over members, the temperature and the OOD distance.

    They stay fp32. Quantised, their activations get one uint8 scale from the calibration films'
    min and max, and the ensemble's members' raw logits span thousands (a fine-tuned member is
    over-confident before its temperature; the bundled model's reached 3131 on a training film):
    a step of ~13 in logit, so every film's answer collapsed onto a handful of values near 0 and
    ``export --int8`` answered ~0.5 for everything (mean |Δprob| 0.46, benchmarks/int8_accuracy.md).
    They are a few matrix products per film; the convolutions, where the time goes, stay INT8.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    frontier = [node for node in proto.graph.node if node.op_type == "GlobalAveragePool"]
    while frontier:
        node = frontier.pop()
        if node.name in found:
            continue
        found[node.name] = None
        frontier.extend(c for out in node.output for c in consumers.get(out, []))
    return list(found)


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration_images: np.ndarray, *,
                  batch_size: int = 16) -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights, MinMax ranges from ``calibration_images``,
    uint8 (N, H, W) at the model's size). Whether the result is good enough is the caller's call:
    see ``compare_auc`` and ``quantize_checked``.

    Activations are uint8 and weights int8 (U8S8): on x86 ONNX Runtime runs that about twice as
    fast as fp32 for MobileNetV2, while S8S8 measured no faster than fp32 (benchmarks/inference.py).
    Weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI the U8S8 kernels add pairs of
    products in int16 (pmaddubsw), which saturates with full-range weights (the research measured
    saturation possible in 9,819 of MobileNetV2's 9,888 pointwise output channels) and then gives
    different answers than on VNNI CPUs; with 7-bit weights it cannot overflow.

    The file carries a self-check (``SELFCHECK_KEY``): a few calibration images and the fp32 and
    INT8 probabilities they got here, scored again when an engine loads the file, so a CPU whose
    integer kernels answer differently falls back to fp32 (``inference.loading``); and it names
    its fp32 source (``fp32_source``: file name and sha256) so that fallback can find it.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path = Path(fp32_path)
    calibration_images = np.asarray(calibration_images)
    if calibration_images.ndim != 3 or calibration_images.dtype != np.uint8 or not len(calibration_images):
        raise UserError(f"calibration images must be a non-empty uint8 (N, H, W) array, "
                        f"got {calibration_images.dtype} {calibration_images.shape}")
    document = get_document(onnx.load(fp32_path, load_external_data=False), fp32_path)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        # shape inference + graph optimisation first, as ORT recommends: the ranges then belong to
        # the fused ops that actually run
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(work) / "int8.onnx"
        kept_fp32 = after_pooling(onnx.load(prepared))
        with _root_logs_to_debug():
            quantize_static(
                str(prepared), str(quantized), _CalibrationReader(calibration_images, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True, nodes_to_exclude=kept_fp32,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # no CalibMaxIntermediateOutputs: ORT 1.32 raises "No data is collected" when the
                # batch count is a multiple of it; memory is bounded by max_calibration instead
            )
        proto = onnx.load(quantized)
        set_document(proto, document | {"precision": "int8", "quantization": {
            "method": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8 (7-bit range)", "reduce_range": True, "calibration": "MinMax",
            "n_calibration_images": int(len(calibration_images)),
            "fp32_nodes": "the pooled features onwards (heads, ensemble mean, temperature, OOD distance)",
        }, "fp32_source": {"name": fp32_path.name, "path": str(fp32_path.resolve()), "sha256": file_sha256(fp32_path)}})
        onnx.save(proto, quantized)
        add_selfcheck(proto, fp32_path, quantized, _spread(calibration_images, SELFCHECK_IMAGES))
        with atomic_path(out_path) as tmp:
            onnx.save(proto, tmp)
    return Path(out_path)


def _spread(images: np.ndarray, n: int) -> np.ndarray:
    return images[np.unique(np.linspace(0, len(images) - 1, n).round().astype(int))]


def add_selfcheck(proto: onnx.ModelProto, fp32_path: Path, int8_path: Path, images: np.ndarray) -> None:
    """Store ``images`` and what the fp32 and the INT8 model (saved at ``int8_path``) answer for them."""
    fp32 = OnnxEngine(fp32_path, threads=1).model_proba(images)
    int8 = OnnxEngine(int8_path, threads=1).model_proba(images)
    kept = [p for p in proto.metadata_props if p.key != SELFCHECK_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=SELFCHECK_KEY, value=encode_selfcheck(images, fp32, int8, SELFCHECK_TOLERANCE))


@contextlib.contextmanager
def _root_logs_to_debug() -> Iterator[None]:
    """ONNX Runtime's quantiser logs straight to the root logger (one line per channel rescaled);
    demote those records to this module's debug log. A filter on the root logger sees only records
    logged on root itself, so pneumoscan's own messages pass untouched."""

    def demote(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        log.debug("onnxruntime: %s", record.getMessage())
        return False

    root = logging.getLogger()
    root.addFilter(demote)
    try:
        yield
    finally:
        root.removeFilter(demote)


def compare_auc(fp32_path: str | Path, int8_path: str | Path, images: np.ndarray, labels) -> dict:
    """ROC-AUC of both models on the same labelled images, and how far their answers differ:
    probabilities, labels at the model's threshold, and OOD flags at its cut-offs."""
    from sklearn.metrics import roc_auc_score

    from pneumoscan.safety.decision import ood_flag

    labels = np.asarray(labels)
    if len(set(labels.tolist())) != 2:
        raise UserError("comparing ROC-AUC needs labelled images of both classes")
    fp32, int8 = OnnxEngine(fp32_path), OnnxEngine(int8_path)
    (z32, ood32), (z8, ood8) = fp32.assess(images), int8.assess(images)
    p32, p8 = metrics.sigmoid(fp32.meta.site_logits(z32)), metrics.sigmoid(int8.meta.site_logits(z8))
    auc32, auc8 = float(roc_auc_score(labels, p32)), float(roc_auc_score(labels, p8))
    threshold = fp32.meta.threshold
    flags_changed = sum(ood_flag(fp32.meta, float(a)) != ood_flag(fp32.meta, float(b)) for a, b in zip(ood32, ood8))
    return {"n": int(len(labels)), "fp32_roc_auc": auc32, "int8_roc_auc": auc8, "delta": auc8 - auc32,
            "max_abs_prob_delta": float(np.abs(p8 - p32).max()),
            "mean_abs_prob_delta": float(np.abs(p8 - p32).mean()),
            "labels_changed": int(((p8 >= threshold) != (p32 >= threshold)).sum()),
            "ood_flags_changed": int(flags_changed)}


def agrees(report: dict, auc_tolerance: float) -> list[str]:
    """Why an INT8 model's answers disagree with fp32's (empty when they agree)."""
    n = max(report["n"], 1)
    problems = []
    if abs(report["delta"]) > auc_tolerance:
        problems.append(f"ROC-AUC moved {report['delta']:+.4f} (tolerance {auc_tolerance})")
    if report["labels_changed"] > INT8_MAX_CHANGED * n:
        problems.append(f"{report['labels_changed']} of {n} labels changed (at most {INT8_MAX_CHANGED:.0%})")
    if report["mean_abs_prob_delta"] > INT8_MAX_MEAN_PROB_DELTA:
        problems.append(f"mean |Δprob| {report['mean_abs_prob_delta']:.3f} (at most {INT8_MAX_MEAN_PROB_DELTA})")
    if report["ood_flags_changed"] > INT8_MAX_CHANGED * n:
        problems.append(f"{report['ood_flags_changed']} of {n} out-of-distribution flags changed "
                        f"(at most {INT8_MAX_CHANGED:.0%})")
    return problems


def quantize_checked(fp32_path: str | Path, out_path: str | Path, calibration_dir: str | Path, *,
                     tolerance: float | None = None, max_calibration: int = 64,
                     max_check: int = 600, seed: int = 0) -> dict:
    """Quantise with images from ``calibration_dir`` and keep the INT8 file only if it agrees with
    fp32 (``agrees``): ROC-AUC within ``tolerance`` (default ``INT8_AUC_TOLERANCE``), and few
    labels, probabilities and OOD flags moved.

    The folder (any layout ``data.scan`` reads) is split by patient: one half calibrates, the other
    is where the two models are compared, so the check never scores an image (or a patient) the
    ranges were fitted on. Returns the comparison with ``written`` saying whether ``out_path`` was
    written; an existing ``out_path`` is left alone when it was not.
    """
    tolerance = INT8_AUC_TOLERANCE if tolerance is None else tolerance
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    size = get_document(onnx.load(fp32_path, load_external_data=False), fp32_path)["meta"]["image_size"]
    pool = [dataclasses.replace(s, split="train") for s in data.scan(calibration_dir)]
    split = data.holdout_split(pool, 0.5, seed, split_name="test")
    rng = np.random.default_rng(seed)

    def subset(name: str, cap: int) -> list[data.Sample]:
        chosen = [s for s in split if s.split == name]
        if len(chosen) > cap:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), cap, replace=False))]
        return chosen

    _, calibration, _ = data.load_images(subset("train", max_calibration), size)
    check_samples, check, _ = data.load_images(subset("test", max_check), size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as work:
        candidate = quantize_onnx(fp32_path, Path(work) / "int8.onnx", calibration)
        report = compare_auc(fp32_path, candidate, check, [s.label for s in check_samples])
        problems = agrees(report, tolerance)
        report |= {"n_calibration": int(len(calibration)), "tolerance": tolerance, "disagreement": problems,
                   "written": not problems}
        if report["written"]:
            os.replace(candidate, out_path)
    level = logging.INFO if report["written"] else logging.WARNING
    log.log(level, "INT8 ROC-AUC %.4f vs fp32 %.4f on %d held-out images (Δ %+.4f, tolerance %.3f): %s",
            report["int8_roc_auc"], report["fp32_roc_auc"], report["n"], report["delta"], tolerance,
            f"wrote {out_path}" if report["written"] else
            "INT8 model not written: " + "; ".join(report["disagreement"]))
    return report
