"""model.pt -> ONNX, kept only when ONNX Runtime answers like PyTorch.

The exporter is TorchScript's (``dynamo=False``): in this torch it exports MobileNetV2 in about a
second at opset 17, while the dynamo exporter takes several times longer and cannot lower the
TF-'SAME' padding to opset 17. Tracing runs forward pre-hooks, so the padding hooks of
``backbones.use_tf_same_padding`` become ``Pad`` nodes; with a fixed image size their pads are
constants, which is exact.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from pneumoscan import __version__
from pneumoscan.modeling import artifact
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path, file_sha256
from pneumoscan.inference import onnx_graph
from pneumoscan.inference.engines import OnnxEngine
from pneumoscan.inference.onnx_format import (CHEST_NAME, FORMAT, INPUT_NAME, METADATA_KEY, OOD_NAME, OUTPUT_NAME,
                                              set_document)
from pneumoscan.inference.torch_model import assess, predict_logits
from pneumoscan.core.metrics import sigmoid

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |prob_onnx - prob_torch| accepted for an fp32 export
OOD_TOLERANCE = 1e-3  # max relative difference of the OOD distance (cut-offs are hundreds wide)
CHEST_TOLERANCE = 1e-3  # max |Δ| of the chest-film logit (a logit, compared with a cut-off near 0)


class ExportError(UserError):
    """The exported model does not behave like the PyTorch one; nothing was written."""


def synthetic_check_images(size: int, n: int = 6, seed: int = 0) -> np.ndarray:
    """Noise, gradients, black and white: exercises every layer without needing data."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = [
        np.zeros((size, size)), np.full((size, size), 255.0),
        np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
    ]
    images += [rng.integers(0, 256, (size, size)) for _ in range(max(0, n - len(images)))]
    return np.stack(images).astype(np.uint8)


def export_onnx(model_path: str | Path, out_path: str | Path, *, opset: int = 17,
                check_images: np.ndarray | None = None, simplify: bool = True) -> Path:
    """Export ``model_path`` to ONNX at ``out_path`` (atomically), or raise ExportError.

    ``check_images`` (uint8 (N, H, W) at the model's size) are what the ONNX and PyTorch
    probabilities are compared on; by default ``synthetic_check_images``. ``simplify``: fold the
    padding into the convolutions (``onnx_graph``), 1.2-2.6x faster in ONNX Runtime; ``False``
    keeps the graph as traced (the benchmarks' baseline).
    """
    model, meta = artifact.load(model_path)
    size = meta.image_size
    try:
        proto = _trace(model, size, opset)
        if simplify:
            proto = onnx_graph.simplify(proto, INPUT_NAME, size)
    except Exception as exc:  # an operator or construct the exporter cannot handle
        raise ExportError(f"cannot export {model_path} to ONNX ({type(exc).__name__}: {exc})") from exc
    proto.producer_name, proto.producer_version = "pneumoscan", __version__
    proto.doc_string = ("P(PNEUMONIA) = sigmoid(logit). Input 'image': grayscale float32 (N, 1, "
                        f"{size}, {size}) in [0, 1]. Meta: metadata_props['{METADATA_KEY}'].")
    set_document(proto, {
        "format": FORMAT,
        "meta": meta.to_dict(),
        "source_sha256": file_sha256(model_path),
        "precision": "fp32",
        "opset": opset,
        "graph": "simplified" if simplify else "as traced",
        "exported_by": f"pneumoscan {__version__}, torch {torch.__version__}",
    })
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"ONNX export of {model_path} is not a valid model: {exc}") from exc

    images = synthetic_check_images(size) if check_images is None else check_images
    expected = sigmoid(predict_logits(model, images))
    _, expected_ood, expected_chest = assess(model, images)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, tmp)
        try:
            logits, got_ood, got_chest = OnnxEngine(tmp, source=model_path).score_all(images)
        except UserError as exc:  # ONNX Runtime cannot load or run what was exported
            raise ExportError(f"ONNX export of {model_path} does not run in ONNX Runtime: {exc}") from exc
        delta = float(np.abs(sigmoid(logits) - expected).max())
        if not delta < PARITY_TOLERANCE:
            raise ExportError(f"ONNX export of {model_path} differs from PyTorch by {delta:.2e} in probability "
                              f"(tolerance {PARITY_TOLERANCE:.0e}); not written")
        ood_delta = (float((np.abs(got_ood - expected_ood) / np.maximum(np.abs(expected_ood), 1.0)).max())
                     if model.ood_head is not None else 0.0)
        if not ood_delta < OOD_TOLERANCE:
            raise ExportError(f"ONNX export of {model_path} differs from PyTorch by {ood_delta:.2e} (relative) in "
                              f"its out-of-distribution score (tolerance {OOD_TOLERANCE:.0e}); not written")
        chest_delta = float(np.abs(got_chest - expected_chest).max()) if model.chest_head is not None else 0.0
        if not chest_delta < CHEST_TOLERANCE:
            raise ExportError(f"ONNX export of {model_path} differs from PyTorch by {chest_delta:.2e} in its "
                              f"chest-film logit (tolerance {CHEST_TOLERANCE:.0e}); not written")
    log.info("exported %s to %s (opset %d, max |Δprob| vs PyTorch %.1e)", model_path, out_path, opset, delta)
    return Path(out_path)


class _Assess(torch.nn.Module):
    """The graph of a model with input checks: (logit, ood_score, chest_logit) from one pass, the
    outputs of the heads it has."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.embed(x)
        heads = [h for h in (self.model.ood_head, self.model.chest_head) if h is not None]
        return (self.model.classify(f), *(h(f) for h in heads))


def _trace(model: torch.nn.Module, size: int, opset: int) -> onnx.ModelProto:
    outputs = ([OUTPUT_NAME] + ([OOD_NAME] if model.ood_head is not None else [])
               + ([CHEST_NAME] if getattr(model, "chest_head", None) is not None else []))
    graph = _Assess(model).eval() if len(outputs) > 1 else model
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarnings from the padding hooks' shape arithmetic (constant at a fixed image size)
        # and the TorchScript exporter's deprecation notice: neither is actionable for a user.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (torch.zeros(2, 1, size, size),), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}} | {name: {0: "batch"} for name in outputs},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())
