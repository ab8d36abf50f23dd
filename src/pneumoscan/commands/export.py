"""``pneumoscan export``: the checked fp32 ONNX export.

The export itself is ``inference.onnx_export.export_onnx`` (the engines export a ``model.pt`` on
first use through it too). ``export --int8`` was withdrawn in issue 20: no post-training INT8
variant kept today's model's final labels (``onnx_format.INT8_WHY``), so the command refuses it
with that reason (``INT8_WITHDRAWN``) and the package has no quantisation code left;
benchmarks/int8_accuracy.py keeps the measurement.
"""

from __future__ import annotations

from pneumoscan.inference.onnx_export import export_onnx
from pneumoscan.inference.onnx_format import INT8_WITHDRAWN

__all__ = ["export_onnx", "INT8_WITHDRAWN"]
