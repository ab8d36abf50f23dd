"""ONNX export: self-describing files, parity with PyTorch enforced, INT8 kept only when as good."""

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
from pneumoscan.inference.onnx_format import get_document
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


def test_int8_quantisation_keeps_meta_and_roughly_the_scores(onnx_model, tmp_path):
    images = xrays(16)
    int8 = export.quantize_onnx(onnx_model, tmp_path / "model.int8.onnx", images[:8])
    proto = onnx.load(int8)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    engine = OnnxEngine(int8)
    assert engine.name == "onnxruntime-int8"
    assert engine.meta == OnnxEngine(onnx_model).meta
    assert get_document(proto)["quantization"]["n_calibration_images"] == 8
    report = export.compare_auc(onnx_model, int8, images[8:], [0, 1] * 4)
    assert set(report) >= {"fp32_roc_auc", "int8_roc_auc", "delta", "max_abs_prob_delta"}
    assert 0 < report["max_abs_prob_delta"] < 0.2  # quantised, so not identical; but close


def test_int8_refused_when_auc_moves_more_than_tolerance(onnx_model, tiny_dataset, tmp_path):
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"previous")
    report = export.quantize_checked(onnx_model, out, tiny_dataset, tolerance=-1.0)  # no model can pass
    assert report["written"] is False and out.read_bytes() == b"previous"
    assert report["n"] > 0 and report["n_calibration"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest_xray", "model.int8.onnx"]


def test_cli_export_with_int8(trained_model, tiny_dataset, tmp_path, capsys, monkeypatch):
    # the tiny model's answers are too noisy to gate here (test_int8_agreement gates the bundled one)
    monkeypatch.setattr(export, "INT8_AUC_TOLERANCE", 1.0)
    monkeypatch.setattr(export, "INT8_MAX_CHANGED", 1.0)
    monkeypatch.setattr(export, "INT8_MAX_MEAN_PROB_DELTA", 1.0)
    out = tmp_path / "m.onnx"
    code = cli.main(["export", "--model", str(trained_model), "--out", str(out), "--int8",
                     "--calibration", str(tiny_dataset)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file() and (tmp_path / "m.int8.onnx").is_file()
    assert "ROC-AUC int8" in captured.out
    assert OnnxEngine(tmp_path / "m.int8.onnx").name == "onnxruntime-int8"

    code = cli.main(["export", "--model", str(trained_model), "--out", str(out), "--int8"])
    assert code == 2 and "--calibration" in capsys.readouterr().err


def _rewrite_selfcheck(path, change) -> None:
    import json

    from pneumoscan.inference.onnx_format import SELFCHECK_KEY

    proto = onnx.load(path)
    entry = next(p for p in proto.metadata_props if p.key == SELFCHECK_KEY)
    doc = json.loads(entry.value)
    change(doc)
    entry.value = json.dumps(doc)
    onnx.save(proto, path)


def test_int8_self_check_passes_here_and_falls_back_to_fp32_on_mismatch(onnx_model, tmp_path, caplog):
    import shutil

    from pneumoscan.inference.loading import load_engine

    fp32 = tmp_path / onnx_model.name
    shutil.copy(onnx_model, fp32)
    int8 = export.quantize_onnx(fp32, tmp_path / "model.int8.onnx", xrays(8))
    doc = get_document(onnx.load(int8))
    assert doc["quantization"]["reduce_range"] is True and doc["fp32_source"]["sha256"] == file_sha256(fp32)
    engine = load_engine(int8)
    assert engine.name == "onnxruntime-int8" and engine.self_check() <= 1e-3

    _rewrite_selfcheck(int8, lambda d: d.update(int8_prob=[p + 0.01 for p in d["int8_prob"]]))
    with caplog.at_level(logging.WARNING):
        fallback = load_engine(int8)
    assert fallback.name == "onnxruntime" and fallback.onnx_path == fp32
    assert "answers differently on this CPU" in caplog.text and len(caplog.records) == 1

    fp32.unlink()  # nowhere to fall back to (the recorded path is the copy just removed)
    with pytest.raises(UserError, match="fails its self-check"):
        load_engine(int8)
