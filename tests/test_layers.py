"""The package's import graph: no cycles, and every module imports only from its layer or below.

Imports inside functions count too: a lazy import still ties two modules together, it only
moves the cost. The layers are those of shared/DESIGN.md, refined by the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pneumoscan

PACKAGE = Path(pneumoscan.__file__).parent

LAYERS = [  # bottom first
    {"pneumoscan", "errors", "files", "config", "metrics"},
    {"dicom"},
    {"imaging"},
    {"data", "gate", "shifts"},
    {"models", "transforms", "artifact"},
    {"inference", "inference.batching", "inference.onnx_format", "inference.torch_model", "inference.engines",
     "inference.onnx_graph", "inference.onnx_export", "inference.loading", "inference.decision", "ood"},
    {"plots", "explain", "export", "evaluate", "report", "robustness"},
    {"predict", "explore", "adapt"},
    {"features", "train", "cv", "experiments", "compare", "ensemble"},
    {"serve", "serve.settings", "serve.card", "serve.uploads", "serve.batcher", "serve.logqueue",
     "serve.middleware", "serve.service", "serve.app",
     "console", "cli", "demo"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "pneumoscan"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """pneumoscan modules that ``path`` imports (``from pneumoscan import x`` counts x if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            # "from package import submodule" imports the submodule; anything else, the module itself
            names = subs if all(s.removeprefix("pneumoscan.") in known for s in subs) else [node.module, *subs]
        else:
            continue
        for name in names:
            if name == "pneumoscan" or name.startswith("pneumoscan."):
                short = name.removeprefix("pneumoscan.") if name != "pneumoscan" else "pneumoscan"
                if short in known:
                    found.add(short)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert set(_modules()) <= set(RANK), f"add to LAYERS: {sorted(set(_modules()) - set(RANK))}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_only_go_down_the_layers():
    upward = [f"{m} (layer {RANK[m]}) imports {d} (layer {RANK[d]})"
              for m, deps in sorted(_graph().items()) for d in sorted(deps)
              if m in RANK and d in RANK and RANK[d] > RANK[m] and d != "pneumoscan"]
    assert not upward, "\n".join(upward)


def test_the_check_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle search itself must be able to fail."""
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"a": {"b"}, "b": {"a"}})
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "a -> b -> a" in str(exc)
    else:
        raise AssertionError("a two-module cycle went unseen")
