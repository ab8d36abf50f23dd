"""The exported graph's rewrites (inference.onnx_graph) are exact: same probabilities, fewer nodes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from pneumoscan.inference import onnx_graph
from pneumoscan.inference.engines import OnnxEngine
from pneumoscan.inference.onnx_export import export_onnx
from test_export import tiny_model, xrays


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(traced, simplified) ONNX files of a TF-'SAME' padded, 'inception'-normalised tiny model."""
    root = tmp_path_factory.mktemp("graph")
    pt = tiny_model(root / "model.pt", tf_same_padding=True, normalization="inception")
    return (export_onnx(pt, root / "traced.onnx", simplify=False), export_onnx(pt, root / "simple.onnx"))


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def test_pads_folded_and_expand_merged(exports):
    traced, simple = map(_ops, exports)
    assert traced["Pad"] == 5 and traced["Expand"] == 1 and traced["Shape"] > 0
    assert simple["Pad"] == simple["Expand"] == simple["Shape"] == 0
    assert simple["Conv"] == traced["Conv"]
    assert sum(simple.values()) < sum(traced.values()) / 2


def test_simplified_graph_scores_like_the_traced_one(exports):
    images = xrays(9, seed=3)
    a, b = (OnnxEngine(p).predict_proba(images, batch_size=9) for p in exports)
    assert np.ptp(a) > 1e-3
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_pad_that_does_not_fit_is_left_alone(exports):
    """A reflecting Pad is not zero padding: folding it into the Conv would change the answer."""
    model = onnx.load(exports[0])
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    kept = [a for a in pad.attribute if a.name != "mode"]
    del pad.attribute[:]
    pad.attribute.extend(kept + [onnx.helper.make_attribute("mode", "reflect")])
    out = onnx_graph.simplify(model, "image", 48)
    assert Counter(n.op_type for n in out.graph.node)["Pad"] == 1
