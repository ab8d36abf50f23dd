"""model.pt -> ONNX (checked against PyTorch), and optional INT8 quantisation checked on ROC-AUC.

The ONNX file is self-describing: its ``metadata_props["pneumoscan"]`` holds the artifact's meta
(image size, normalisation, threshold, temperature, class names, ...) and the source model's
sha256, so ONNX Runtime users need nothing else. Input ``image`` is float32 (N, 1, H, W) in [0, 1];
output ``logit`` is the calibrated logit (N,); the batch axis is dynamic.

The exporter is TorchScript's (``dynamo=False``): in this torch it exports MobileNetV2 in about a
second at opset 17, while the dynamo exporter takes several times longer and cannot lower the
TF-'SAME' padding to opset 17. Tracing runs forward pre-hooks, so the padding hooks of
``models.use_tf_same_padding`` become ``Pad`` nodes; with a fixed image size their pads are
constants, which is exact. Every export is compared with PyTorch before it is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch

from pneumoscan import __version__, artifact, data
from pneumoscan.engine import INPUT_NAME, METADATA_KEY, ONNX_FORMAT, OUTPUT_NAME, OnnxEngine
from pneumoscan.errors import UserError
from pneumoscan.evaluate import predict_logits
from pneumoscan.files import atomic_path
from pneumoscan.metrics import sigmoid
from pneumoscan.models import file_sha256

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |prob_onnx - prob_torch| accepted for an fp32 export
INT8_AUC_TOLERANCE = 0.005  # max |ROC-AUC int8 - ROC-AUC fp32| for an INT8 model to be kept


class ExportError(UserError):
    """The exported model does not behave like the PyTorch one; nothing was written."""


def export_onnx(model_path: str | Path, out_path: str | Path, *, opset: int = 17,
                check_images: np.ndarray | None = None) -> Path:
    """Export ``model_path`` to ONNX at ``out_path`` (atomically), or raise ExportError.

    ``check_images`` (uint8 (N, H, W) at the model's size) are what the ONNX and PyTorch
    probabilities are compared on; by default a fixed set of synthetic images (noise, gradients,
    black and white), which exercises every layer without needing data.
    """
    model, meta = artifact.load(model_path)
    size = meta["image_size"]
    try:
        proto = _trace(model, size, opset)
    except Exception as exc:  # an operator or construct the exporter cannot handle
        raise ExportError(f"cannot export {model_path} to ONNX ({type(exc).__name__}: {exc})") from exc
    proto.producer_name, proto.producer_version = "pneumoscan", __version__
    proto.doc_string = ("P(PNEUMONIA) = sigmoid(logit). Input 'image': grayscale float32 (N, 1, "
                        f"{size}, {size}) in [0, 1]. Meta: metadata_props['{METADATA_KEY}'].")
    set_document(proto, {
        "format": ONNX_FORMAT,
        "meta": meta,
        "source_sha256": file_sha256(model_path),
        "precision": "fp32",
        "opset": opset,
        "exported_by": f"pneumoscan {__version__}, torch {torch.__version__}",
    })
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"ONNX export of {model_path} is not a valid model: {exc}") from exc

    images = synthetic_check_images(size) if check_images is None else check_images
    expected = sigmoid(predict_logits(model, images))
    with atomic_path(out_path) as tmp:
        onnx.save(proto, tmp)
        try:
            got = OnnxEngine(tmp, source=model_path).predict_proba(images)
        except UserError as exc:  # ONNX Runtime cannot load or run what was exported
            raise ExportError(f"ONNX export of {model_path} does not run in ONNX Runtime: {exc}") from exc
        delta = float(np.abs(got - expected).max())
        if not delta < PARITY_TOLERANCE:
            raise ExportError(f"ONNX export of {model_path} differs from PyTorch by {delta:.2e} in probability "
                              f"(tolerance {PARITY_TOLERANCE:.0e}); not written")
    log.info("exported %s to %s (opset %d, max |Δprob| vs PyTorch %.1e)", model_path, out_path, opset, delta)
    return Path(out_path)


def _trace(model: torch.nn.Module, size: int, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarnings from the padding hooks' shape arithmetic (constant at a fixed image size)
        # and the TorchScript exporter's deprecation notice: neither is actionable for a user.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 1, size, size),), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def set_document(proto: onnx.ModelProto, document: dict) -> None:
    """Store pneumoscan's JSON document in ``metadata_props`` (replacing an older one)."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(document))


def get_document(proto: onnx.ModelProto) -> dict:
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise UserError(f"not a pneumoscan ONNX model (no {METADATA_KEY!r} metadata)")


def synthetic_check_images(size: int, n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = [
        np.zeros((size, size)), np.full((size, size), 255.0),
        np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
    ]
    images += [rng.integers(0, 256, (size, size)) for _ in range(max(0, n - len(images)))]
    return np.stack(images).astype(np.uint8)


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
        self._batches = ({INPUT_NAME: self.images[i:i + self.batch_size, None].astype(np.float32) / 255}
                         for i in range(0, len(self.images), self.batch_size))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration_images: np.ndarray, *,
                  batch_size: int = 16) -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights, MinMax ranges from ``calibration_images``,
    uint8 (N, H, W) at the model's size). Whether the result is good enough is the caller's call:
    see ``compare_auc`` and ``quantize_checked``.

    Activations are uint8 and weights int8 (U8S8): on x86 ONNX Runtime runs that about twice as
    fast as fp32 for MobileNetV2, while S8S8 measured no faster than fp32 (benchmarks/inference.py).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path = Path(fp32_path)
    calibration_images = np.asarray(calibration_images)
    if calibration_images.ndim != 3 or calibration_images.dtype != np.uint8 or not len(calibration_images):
        raise UserError(f"calibration images must be a non-empty uint8 (N, H, W) array, "
                        f"got {calibration_images.dtype} {calibration_images.shape}")
    document = get_document(onnx.load(fp32_path, load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="pneumoscan-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        # shape inference + graph optimisation first, as ORT recommends: the ranges then belong to
        # the fused ops that actually run
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(work) / "int8.onnx"
        with _root_logs_to_debug():
            quantize_static(
                str(prepared), str(quantized), _CalibrationReader(calibration_images, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # no CalibMaxIntermediateOutputs: ORT 1.32 raises "No data is collected" when the
                # batch count is a multiple of it; memory is bounded by max_calibration instead
            )
        proto = onnx.load(quantized)
        set_document(proto, document | {"precision": "int8", "quantization": {
            "method": "onnxruntime quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8", "calibration": "MinMax",
            "n_calibration_images": int(len(calibration_images)),
        }})
        with atomic_path(out_path) as tmp:
            onnx.save(proto, tmp)
    return Path(out_path)


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
    """ROC-AUC of both models on the same labelled images, and how far their probabilities differ."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(set(labels.tolist())) != 2:
        raise UserError("comparing ROC-AUC needs labelled images of both classes")
    p32 = OnnxEngine(fp32_path).predict_proba(images)
    p8 = OnnxEngine(int8_path).predict_proba(images)
    auc32, auc8 = float(roc_auc_score(labels, p32)), float(roc_auc_score(labels, p8))
    return {"n": int(len(labels)), "fp32_roc_auc": auc32, "int8_roc_auc": auc8, "delta": auc8 - auc32,
            "max_abs_prob_delta": float(np.abs(p8 - p32).max())}


def quantize_checked(fp32_path: str | Path, out_path: str | Path, calibration_dir: str | Path, *,
                     tolerance: float | None = None, max_calibration: int = 64,
                     max_check: int = 600, seed: int = 0) -> dict:
    """Quantise with images from ``calibration_dir`` and keep the INT8 file only if its ROC-AUC is
    within ``tolerance`` (default ``INT8_AUC_TOLERANCE``) of fp32's.

    The folder (any layout ``data.scan`` reads) is split by patient: one half calibrates, the other
    is where the two models are compared, so the check never scores an image (or a patient) the
    ranges were fitted on. Returns the comparison with ``written`` saying whether ``out_path`` was
    written; an existing ``out_path`` is left alone when it was not.
    """
    tolerance = INT8_AUC_TOLERANCE if tolerance is None else tolerance
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    size = get_document(onnx.load(fp32_path, load_external_data=False))["meta"]["image_size"]
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
        report |= {"n_calibration": int(len(calibration)), "tolerance": tolerance,
                   "written": abs(report["delta"]) <= tolerance}
        if report["written"]:
            os.replace(candidate, out_path)
    level = logging.INFO if report["written"] else logging.WARNING
    log.log(level, "INT8 ROC-AUC %.4f vs fp32 %.4f on %d held-out images (Δ %+.4f, tolerance %.3f): %s",
            report["int8_roc_auc"], report["fp32_roc_auc"], report["n"], report["delta"], tolerance,
            f"wrote {out_path}" if report["written"] else "INT8 model not written")
    return report
