"""Inference engines: ONNX Runtime and PyTorch agree, .pt exports are cached, failures fall back."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from PIL import Image

from pneumoscan.commands import predict
from pneumoscan.inference import loading, onnx_export
from pneumoscan.inference.engines import OnnxEngine, TorchEngine
from pneumoscan.inference.loading import load_engine
from pneumoscan.inference.onnx_format import get_document
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from test_export import tiny_model, xrays


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_cache(cache, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def padded_pt(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("padded") / "model.pt", tf_same_padding=True)


def test_pt_is_exported_once_then_reused(model_pt, cache, monkeypatch):
    sha = file_sha256(model_pt)
    cached = cache / "onnx" / f"{sha}.onnx"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"left over from a crash")  # unreadable: must be replaced, not trusted

    first = load_engine(model_pt)
    assert isinstance(first, OnnxEngine) and first.name == "onnxruntime"
    assert first.sha256 == sha and first.path == model_pt and first.onnx_path == cached
    assert get_document(onnx.load(cached))["source_sha256"] == sha

    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of using the cache")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    mtime = cached.stat().st_mtime_ns
    second = load_engine(model_pt, "onnx")
    assert isinstance(second, OnnxEngine) and second.onnx_path == cached and cached.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("which", ["model_pt", "padded_pt"])
def test_onnx_and_torch_engines_agree(which, request):
    """Also for TF-'SAME' padding, which lives in forward pre-hooks: an export that dropped them
    would still run, just wrongly (48 px reaches a stride-2 conv at an odd size, 3 px)."""
    pt = request.getfixturevalue(which)
    onnx_engine, torch_engine = load_engine(pt, "onnx"), load_engine(pt, "torch")
    graph = onnx.load(onnx_engine.onnx_path).graph
    assert not any(n.op_type == "Pad" for n in graph.node)  # folded into the convolutions (onnx_graph)
    uneven = [n for n in graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "pads" and len(set(a.ints)) > 1]
    # MobileNetV2's five stride-2 convolutions; the last, at 3 px, gets an even 1 px on each side
    assert len(uneven) == (4 if which == "padded_pt" else 0)
    assert isinstance(onnx_engine, OnnxEngine) and isinstance(torch_engine, TorchEngine)
    assert onnx_engine.meta == torch_engine.meta  # meta round trip through metadata_props
    assert onnx_engine.sha256 == torch_engine.sha256
    images = xrays(5)
    for n in (1, 5):  # dynamic batch axis
        got, expected = onnx_engine.predict_proba(images[:n]), torch_engine.predict_proba(images[:n])
        assert got.shape == expected.shape == (n,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3
    assert np.allclose(onnx_engine.predict_proba(images, batch_size=2), expected, atol=1e-5)


def test_onnx_file_runs_directly(model_pt, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(load_engine(model_pt, "onnx").onnx_path.read_bytes())
    engine = load_engine(path)
    assert isinstance(engine, OnnxEngine) and engine.path == path and engine.sha256 == file_sha256(path)
    with pytest.raises(UserError, match="needs a model.pt"):
        load_engine(path, "torch")


def test_wrong_input_is_a_clear_error(model_pt):
    engine = load_engine(model_pt, "onnx")
    with pytest.raises(ValueError, match=r"uint8 images \(N, 48, 48\)"):
        engine.predict_proba(np.zeros((2, 32, 32), np.uint8))


@pytest.mark.parametrize("failure", [RuntimeError("exporter bug"), onnx_export.ExportError("differs from PyTorch")])
def test_export_failure_falls_back_to_torch(model_pt, monkeypatch, caplog, failure):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(model_pt.parent / "empty-cache"))

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="pneumoscan.inference.loading"):
        engine = load_engine(model_pt)
    assert isinstance(engine, TorchEngine) and engine.name == "torch"
    assert "running it with PyTorch" in caplog.text and str(model_pt) in caplog.text
    with pytest.raises(UserError):
        load_engine(model_pt, "onnx")  # asked for ONNX explicitly: no silent fallback


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_engine(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="unknown engine"):
        load_engine(tmp_path / "missing.pt", "tensorrt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable pneumoscan model"):
        load_engine(tmp_path / "junk.pt")  # not an exporter problem: no fallback, the real reason
    plain = tmp_path / "plain.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), plain)
    with pytest.raises(UserError, match="not a pneumoscan ONNX model"):
        load_engine(plain)


def test_predict_files_same_with_either_engine(model_pt, tmp_path):
    for i, img in enumerate(xrays(4)):
        Image.fromarray(img).save(tmp_path / f"x{i}.png")
    rows = {kind: predict.predict_files(model_pt, [tmp_path], engine=kind)[0] for kind in ("auto", "torch")}
    assert [r.path for r in rows["auto"]] == [r.path for r in rows["torch"]]
    np.testing.assert_allclose([r.probability for r in rows["auto"]], [r.probability for r in rows["torch"]],
                               atol=1e-4)
    loaded = load_engine(model_pt, "torch")
    again, _ = predict.predict_files(None, [tmp_path], engine=loaded)
    assert [r.probability for r in again] == [r.probability for r in rows["torch"]]


def test_cache_dir_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PNEUMOSCAN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loading.cache_dir() == tmp_path / "pneumoscan"
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path / "mine"))
    assert loading.cache_dir() == tmp_path / "mine"
