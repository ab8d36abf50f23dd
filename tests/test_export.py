"""ONNX export: self-describing files, parity with PyTorch enforced; INT8 withdrawn (issue 20)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch

from conftest import synthetic_xray
from pneumoscan.modeling import artifact, models
from pneumoscan.cli import app as cli
from pneumoscan.commands import export
from pneumoscan.inference import onnx_export
from pneumoscan.inference.engines import OnnxEngine, TorchEngine
from pneumoscan.inference.onnx_format import get_document, set_document
from pneumoscan.inference.torch_model import as_batch
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256


def xrays(n: int, size: int = 48, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([synthetic_xray(rng, i % 2, size) for i in range(n)])


def tiny_model(path, *, tf_same_padding: bool = False, size: int = 48, normalization: str = "auto"):
    """A random MobileNetV2 artifact whose scores differ between images (untrained, its BatchNorm
    defaults would make every image score the same, and parity on constants proves nothing)."""
    torch.manual_seed(0)
    model, info = models.build("mobilenet_v2", weights="none", tf_same_padding=tf_same_padding,
                               normalization=normalization)
    norms = [m for m in model.features.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # running statistics = this batch's
        bn.train()
    with torch.no_grad():
        model(as_batch(xrays(16, size, seed=0)))
    model.eval()
    model.temperature.fill_(1.5)
    meta = artifact.make_meta(architecture="mobilenet_v2", head="seed", image_size=size, weights_info=info,
                              threshold=0.4, threshold_rule="test", config={})
    return artifact.save(path, model, meta)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def onnx_model(trained_model, tmp_path_factory):
    return export.export_onnx(trained_model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_is_valid_and_self_describing(trained_model, onnx_model):
    proto = onnx.load(onnx_model)
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and out.name == "logit"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 48, 48]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    doc = get_document(proto)
    _, meta = artifact.load(trained_model)
    assert doc["meta"] == meta.to_dict()  # the whole artifact meta: threshold, temperature, class names, ...
    assert doc["source_sha256"] == file_sha256(trained_model) and doc["precision"] == "fp32"
    assert {"image_size", "normalization", "threshold", "temperature", "class_names", "architecture",
            "pneumoscan_version"} <= set(doc["meta"])
    assert OnnxEngine(onnx_model).meta == meta


def test_onnx_matches_pytorch_at_any_batch_size(trained_model, onnx_model):
    onnx_engine, torch_engine = OnnxEngine(onnx_model), TorchEngine(trained_model)
    images = xrays(5)
    for n in (1, 5):
        expected = torch_engine.predict_proba(images[:n])
        got = onnx_engine.predict_proba(images[:n])
        assert got.shape == (n,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # a model that says the same for everything would prove nothing


def test_export_that_disagrees_with_pytorch_is_refused(trained_model, tmp_path, monkeypatch):
    real = onnx_export.predict_logits
    monkeypatch.setattr(onnx_export, "predict_logits", lambda model, images: real(model, images) + 0.01)
    out = tmp_path / "model.onnx"
    with pytest.raises(onnx_export.ExportError, match="differs from PyTorch"):
        export.export_onnx(trained_model, out)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_cli_export_int8_is_withdrawn_with_one_line(trained_model, tmp_path, capsys):
    """``export --int8`` (and its ``--calibration``) say why INT8 is gone, write nothing, exit 2."""
    out = tmp_path / "m.onnx"
    for extra in (["--int8"], ["--int8", "--calibration", str(tmp_path)], ["--calibration", str(tmp_path)]):
        code = cli.main(["export", "--model", str(trained_model), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "--int8 was withdrawn" in err and "benchmarks/int8_accuracy.md" in err
    assert list(tmp_path.iterdir()) == []


def _as_legacy_int8(fp32, path) -> None:
    """A file shaped like one ``export --int8`` wrote before it was withdrawn (its document says
    ``precision: int8`` and names its fp32 source); its graph does not matter here."""
    proto = onnx.load(fp32)
    set_document(proto, get_document(proto) | {"precision": "int8", "fp32_source": {
        "name": fp32.name, "path": str(fp32.resolve()), "sha256": file_sha256(fp32)}})
    onnx.save(proto, path)


def test_legacy_int8_file_runs_its_fp32_source_or_is_refused(onnx_model, tmp_path, caplog):
    import shutil

    from pneumoscan.inference.loading import load_engine

    fp32 = tmp_path / onnx_model.name
    shutil.copy(onnx_model, fp32)
    int8 = tmp_path / "model.int8.onnx"
    _as_legacy_int8(fp32, int8)
    with caplog.at_level(logging.WARNING):
        engine = load_engine(int8)
    assert engine.onnx_path == fp32 and engine.name == "onnxruntime"
    assert "INT8" in caplog.text and "withdrawn" in caplog.text and len(caplog.records) == 1

    fp32.unlink()  # nowhere to fall back to (the recorded path is the copy just removed)
    with pytest.raises(UserError, match="INT8.*withdrawn"):
        load_engine(int8)
