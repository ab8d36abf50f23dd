"""The package's import graph: no cycles, and every module imports only from its layer or below.

Imports inside functions count too: a lazy import still ties two modules together, it only
moves the cost. The layers are those of shared/DESIGN.md, refined by the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pneumoscan

PACKAGE = Path(pneumoscan.__file__).parent

LAYERS = [  # bottom first: each subpackage is one layer (the package root holds constants only)
    "pneumoscan",
    "core",        # errors, atomic files, typed config, numeric methods; no torch
    "io",          # decoding files and DICOM, datasets, patients, splits
    "modeling",    # networks, weights, transforms, model.pt metadata
    "inference",   # engines, batching, ONNX
    "safety",      # quality gate, OOD, decision and flags, prevalence adaptation
    "evaluation",  # metrics with CIs on data, reports, plots, explanations, robustness
    "training",    # the training pipeline, cv, experiments
    "store",       # the result store (SQLAlchemy)
    "commands",    # jobs the faces run
    "serve",       # faces: REST API and page,
    "node",        #        DICOM node,
    "cli",         #        command line and demo
]
RANK = {name: i for i, name in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """The layer of a module: its top-level subpackage."""
    return module.split(".")[0]


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
    unplaced = sorted(m for m in _modules() if layer_of(m) not in RANK)
    assert not unplaced, f"put these in a layer's subpackage, or add the subpackage to LAYERS: {unplaced}"


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
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
              for m, deps in sorted(_graph().items()) for d in sorted(deps)
              if RANK[layer_of(d)] > RANK[layer_of(m)]]
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
