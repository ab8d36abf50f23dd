"""Rewrites of the exported graph that change how fast ONNX Runtime runs it, not what it computes.

The TF-'SAME' padding hooks (``backbones.use_tf_same_padding``) trace to ``Pad`` nodes whose pads
are computed at run time from the input's shape (about 150 Shape/Gather/Concat nodes, because
the batch axis is dynamic). ONNX Runtime cannot keep a tensor in its blocked (NCHWc) layout
across a ``Pad``, so it reorders before and after each one, and at batch 32 those reorders cost
more than the padding itself: batch 32 ran slower per image than batch 1. The image size is
fixed, so every pad is a constant; ``fold_pads`` moves each into the following Conv's own
(asymmetric) ``pads`` attribute, which is the same zero padding, and the shape arithmetic dies.

``merge_gray_expand`` removes the 1 -> 3 channel ``Expand`` when the normalisation's mean and
std are the same for every channel (the 'inception' normalisation): three identical input
channels through the first Conv equal one channel through the Conv with its weights summed
over input channels.

Both rewrites are checked by the export's parity test against PyTorch, like the rest of the file.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


def simplify(proto: onnx.ModelProto, input_name: str, size: int) -> onnx.ModelProto:
    """``proto`` with constant Pads folded into their Convs, the gray Expand merged where exact,
    and the nodes nothing uses any more removed. Returns a new model; ``proto`` is untouched."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    before = Counter(n.op_type for n in model.graph.node)
    folded = fold_pads(model, input_name, size)
    prune(model)  # the pad arithmetic read the tensors merge_gray_expand needs to find unshared
    merged = merge_gray_expand(model)
    prune(model)
    log.debug("graph simplified: %d Pad folded, gray Expand %s, %d -> %d nodes", folded,
              "merged" if merged else "kept", sum(before.values()), len(model.graph.node))
    return model


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _runtime_values(model: onnx.ModelProto, names: list[str], input_name: str, size: int) -> list[dict]:
    """The values of tensors ``names`` for a zero image at batch 1 and at batch 3, by running the
    graph with them as extra outputs (a pad that depended on the batch size would differ)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.INT64, None)  # Pad pads are int64
                              for t in names if t not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = []
    for batch in (1, 3):
        image = np.zeros((batch, 1, size, size), dtype=np.float32)
        runs.append(dict(zip(names, session.run(names, {input_name: image}))))
    return runs


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a Constant node's output (through Identity)."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if name in node.output:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                return numpy_helper.to_array(node.attribute[0].t)
            if node.op_type == "Identity":
                return _constant(graph, node.input[0])
    return None


def _foldable(graph: onnx.GraphProto, pad: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Conv a Pad can be folded into: its only consumer, a 2-D Conv without auto_pad, and a
    zero, constant-mode pad."""
    if _attribute(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) > 3:
        return None
    if len(pad.input) == 3 and pad.input[2]:
        value = _constant(graph, pad.input[2])
        if value is None or np.any(value != 0):
            return None
    users = _consumers(graph, pad.output[0])
    outputs = {o.name for o in graph.output}
    if len(users) != 1 or pad.output[0] in outputs:
        return None
    (conv,) = users
    if conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
        return None
    if _attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return conv


def fold_pads(model: onnx.ModelProto, input_name: str, size: int) -> int:
    """Fold every constant zero Pad (N, C untouched, H/W non-negative) into its Conv; returns how
    many were folded. Pads that do not fit are left as they are."""
    graph = model.graph
    candidates = [(p, c) for p in graph.node if p.op_type == "Pad" for c in [_foldable(graph, p)] if c is not None]
    if not candidates:
        return 0
    values = _runtime_values(model, [p.input[1] for p, _ in candidates], input_name, size)
    folded = 0
    for pad, conv in candidates:
        first, second = (np.asarray(v[pad.input[1]]).astype(np.int64).ravel() for v in values)
        if first.shape != (8,) or not np.array_equal(first, second):
            continue  # not a 4-D pad, or one that depends on the batch size
        pads = first
        if pads[[0, 1, 4, 5]].any() or (pads < 0).any():
            continue  # pads the batch or channel axis, or crops
        old = list(_attribute(conv, "pads", [0, 0, 0, 0]))
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    return folded


def merge_gray_expand(model: onnx.ModelProto) -> bool:
    """Expand(1 -> 3) -> Sub(mean) -> Div(std) -> Conv becomes Sub -> Div -> Conv on one channel
    when mean and std are equal over channels; True if it was."""
    graph = model.graph
    expands = [n for n in graph.node if n.op_type == "Expand"]
    if len(expands) != 1:
        return False
    (expand,) = expands
    chain = _consumers(graph, expand.output[0])
    if len(chain) != 1 or chain[0].op_type != "Sub" or chain[0].input[0] != expand.output[0]:
        return False
    sub = chain[0]
    chain = _consumers(graph, sub.output[0])
    if len(chain) != 1 or chain[0].op_type != "Div" or chain[0].input[0] != sub.output[0]:
        return False
    div = chain[0]
    convs = _consumers(graph, div.output[0])
    if len(convs) != 1 or convs[0].op_type != "Conv" or (_attribute(convs[0], "group", 1) != 1):
        return False
    conv = convs[0]
    mean, std = _constant(graph, sub.input[1]), _constant(graph, div.input[1])
    weight = next((i for i in graph.initializer if i.name == conv.input[1]), None)
    if mean is None or std is None or weight is None:
        return False
    mean, std, w = mean.ravel(), std.ravel(), numpy_helper.to_array(weight)
    if mean.size != 3 or std.size != 3 or np.ptp(mean) or np.ptp(std) or w.ndim != 4 or w.shape[1] != 3:
        return False
    if sum(conv.input[1] in n.input for n in graph.node) != 1:
        return False  # the weight is shared: summing it would change another node
    weight.CopyFrom(numpy_helper.from_array(w.sum(axis=1, keepdims=True).astype(w.dtype), weight.name))
    graph.initializer.extend([numpy_helper.from_array(np.array(mean[0], np.float32), "gray_mean"),
                              numpy_helper.from_array(np.array(std[0], np.float32), "gray_std")])
    sub.input[0], sub.input[1], div.input[1] = expand.input[0], "gray_mean", "gray_std"
    graph.node.remove(expand)
    return True


def prune(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    graph = model.graph
    while True:
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    kept = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(kept)
