"""The default scoring path starts light: the bundled model's shipped ONNX, no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
from PIL import Image

from pneumoscan.modeling import artifact
from pneumoscan.core.files import file_sha256
from pneumoscan.inference import loading
from pneumoscan.inference.onnx_format import get_document

HEAVY = ("torch", "torchvision", "sklearn", "scipy")

SCRIPT = """
import json, sys
from pneumoscan.commands import predict
from pneumoscan.inference import engines, loading
engine = loading.load_engine()
rows, skipped = predict.predict_files(None, [sys.argv[1]], engine=engine)
print(json.dumps({"engine": type(engine).__name__, "onnx": str(engine.onnx_path), "n": len(rows),
                  "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_bundled_onnx_is_the_export_of_the_bundled_model():
    doc = get_document(onnx.load(loading.BUNDLED_ONNX, load_external_data=False))
    assert doc["source_sha256"] == file_sha256(artifact.BUNDLED_MODEL), "rerun tools/export_bundled_onnx.py"
    assert doc["precision"] == "fp32" and doc.get("graph") == "simplified"


def test_default_predict_imports_no_torch(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)).save(image)
    env = os.environ | {"PNEUMOSCAN_CACHE_DIR": str(tmp_path / "empty-cache"),
                        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(image)], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"engine": "OnnxEngine", "onnx": str(loading.BUNDLED_ONNX), "n": 1, "loaded": []}
    assert not (tmp_path / "empty-cache").exists()  # nothing exported


def test_stale_shipped_onnx_is_not_used(tmp_path, monkeypatch, caplog):
    """A model.pt retrained without rerunning the tool: its shipped export must not answer for it."""
    from test_export import tiny_model

    pt = tiny_model(tmp_path / "model.pt")
    stale = tmp_path / "model.onnx"
    stale.write_bytes(loading.BUNDLED_ONNX.read_bytes())  # exported from another model.pt
    monkeypatch.setattr(artifact, "BUNDLED_MODEL", pt)
    monkeypatch.setattr(loading, "BUNDLED_ONNX", stale)
    engine = loading.load_engine(None)
    assert engine.onnx_path != stale and engine.sha256 == file_sha256(pt)
    assert "not exported from this" in caplog.text


SERVE_SCRIPT = """
import json, sys
from pneumoscan.serve.app import create_app
from pneumoscan.serve.service import Service
service = Service.load(sys.argv[1])
print(json.dumps({"explain": service.can_explain, "loaded": [m for m in %r if m in sys.modules]}))
service.close()
""" % (HEAVY,)


def test_serving_an_onnx_model_imports_no_torch(tmp_path):
    env = os.environ | {"PNEUMOSCAN_CACHE_DIR": str(tmp_path / "empty-cache"),
                        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(loading.BUNDLED_ONNX)], capture_output=True,
                         text=True, env=env, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"explain": False, "loaded": []}
