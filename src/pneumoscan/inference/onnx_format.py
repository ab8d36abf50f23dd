"""The ONNX file pneumoscan writes and reads: its input, output and metadata document.

The file is self-describing: ``metadata_props["pneumoscan"]`` holds a JSON document with the
model's ``ModelMeta`` (image size, normalisation, threshold, temperature, class names, ...) and
the source model's sha256, so ONNX Runtime users need nothing else. Input ``image`` is float32
(N, 1, H, W) in [0, 1]; output ``logit`` is the calibrated logit (N,), and ``ood_score`` (N,) the
out-of-distribution distance when the model has a detector; the batch axis is dynamic.

``onnx_export`` writes such files; ``engines`` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoscan.core.errors import UserError

if TYPE_CHECKING:
    import onnx

METADATA_KEY = "pneumoscan"  # ONNX metadata_props key holding the JSON document
# Why pneumoscan writes and runs no INT8 model any more (``pneumoscan export --int8`` says it; an
# INT8 file from an earlier version runs its fp32 source instead, ``inference.loading``)
INT8_WHY = ("post-training INT8 changed too many of the model's final labels against fp32: at best 4 of 165 "
            "where at most 1% may (13-20 with the 7-bit weights that are fast and exact on x86 CPUs without "
            "VNNI, mostly to NOT_ASSESSED through the out-of-distribution check); see benchmarks/int8_accuracy.md")
INT8_WITHDRAWN = f"--int8 was withdrawn because {INT8_WHY}. Use the fp32 model"
FORMAT = "pneumoscan-onnx/1"  # {"format", "meta", "source_sha256", "precision", "opset", "exported_by", ...}
INPUT_NAME, OUTPUT_NAME = "image", "logit"
OOD_NAME = "ood_score"  # second output, when the model has an OOD detector: (N,) Mahalanobis distance
CHEST_NAME = "chest_logit"  # next output, when the model has a chest-film detector: (N,) logit


def parse_document(raw: str | None, path: str | Path) -> dict[str, Any]:
    """The pneumoscan document from a metadata value, or UserError naming the file."""
    try:
        doc = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "meta" not in doc:
        raise UserError(f"{path} is not a pneumoscan ONNX model (no {METADATA_KEY!r} metadata of format "
                        f"{FORMAT}); export one with 'pneumoscan export'")
    return doc


def session_document(session, path: str | Path) -> dict[str, Any]:
    """The document of a loaded ONNX Runtime session."""
    return parse_document(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)


def set_document(proto: "onnx.ModelProto", document: dict) -> None:
    """Store pneumoscan's JSON document in ``metadata_props`` (replacing an older one)."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(document))


def get_document(proto: "onnx.ModelProto", path: str | Path = "model") -> dict:
    raw = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    return parse_document(raw, path)
