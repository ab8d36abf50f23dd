"""Which engine answers for a model file.

A ``.onnx`` file runs in ONNX Runtime. A ``model.pt`` is exported to ONNX once, cached under the
user's cache folder by the file's sha256 (so a retrained model never reuses a stale export), and
run there: ONNX Runtime starts faster, uses less memory and is quicker on CPU than eager
PyTorch. Any export failure falls back to PyTorch with a warning, because a slower answer beats
none; ``kind="torch"`` forces PyTorch (Grad-CAM needs it anyway, and it is the reference the
export is checked against).

The bundled model ships with its export (``BUNDLED_ONNX``, written by
tools/export_bundled_onnx.py), so the default model scores without exporting and without
importing torch: ~0.5 s from a cold start instead of ~4 s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pneumoscan.modeling import artifact
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from pneumoscan.inference.engines import Engine, OnnxEngine, TorchEngine
from pneumoscan.inference.onnx_format import INT8_WHY

log = logging.getLogger(__name__)

KINDS = ("auto", "onnx", "torch")
BUNDLED_ONNX = artifact.BUNDLED_MODEL.with_suffix(".onnx")  # the bundled model.pt's checked export


def cache_dir() -> Path:
    """``$PNEUMOSCAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pneumoscan``, else ``~/.cache/pneumoscan``."""
    if os.environ.get("PNEUMOSCAN_CACHE_DIR"):
        return Path(os.environ["PNEUMOSCAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumoscan"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown engine {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def load_engine(path: str | Path | None = None, kind: str = "auto", *, threads: int | None = None) -> Engine:
    """The model at ``path`` (default: the bundled one) ready to score images.

    kind: ``auto`` (ONNX Runtime, via a cached export for ``.pt``; PyTorch if that fails),
    ``onnx`` (ONNX Runtime or an error) or ``torch`` (PyTorch eager; ``.pt`` only).
    """
    check_kind(kind)
    path = artifact.resolve(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        if kind == "torch":
            raise UserError(f"{path} is an ONNX model; the torch engine needs a model.pt")
        return checked_onnx_engine(path, threads=threads)
    if kind == "torch":
        return TorchEngine(path)
    try:
        return shipped_onnx_engine(path, threads=threads) or cached_onnx_engine(path, threads=threads)
    except UserError as exc:
        from pneumoscan.inference.onnx_export import ExportError

        if kind == "onnx" or not isinstance(exc, ExportError):
            raise  # a file that is not a model fails the same way in PyTorch: say so once
        reason = str(exc)
    except Exception as exc:  # an exporter or runtime limitation, not the user's mistake
        if kind == "onnx":
            raise UserError(f"cannot run {path} with ONNX Runtime ({type(exc).__name__}: {exc})") from exc
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("ONNX export of %s failed (%s); running it with PyTorch instead", path, reason)
    return TorchEngine(path)


def checked_onnx_engine(path: Path, *, threads: int | None = None) -> OnnxEngine:
    """An ONNX file's engine; for an INT8 file (``export --int8`` wrote them before it was
    withdrawn) its fp32 source (``fp32_source`` in its document) instead, with one warning saying
    why, or a UserError when that is not there.

    INT8 is not run at all: its answers moved too far from fp32's (``onnx_format.INT8_WHY``), and a
    site that kept such a file must not get those answers silently."""
    engine = OnnxEngine(path, threads=threads)
    if engine.document.get("precision") != "int8":
        return engine
    fp32 = fp32_source(path, engine.document)
    if fp32 is None:
        raise UserError(f"{path} is an INT8 model, which pneumoscan no longer runs: INT8 was withdrawn because "
                        f"{INT8_WHY}. Its fp32 source is not beside it: use the fp32 model")
    log.warning("%s is an INT8 model, which pneumoscan no longer runs: INT8 was withdrawn because %s. Using its "
                "fp32 source %s instead", path.name, INT8_WHY, fp32)
    return OnnxEngine(fp32, threads=threads)


def fp32_source(int8_path: Path, document: dict) -> Path | None:
    """The fp32 file an INT8 file was quantised from: beside it by name, else where it was, if its sha256 matches."""
    source = document.get("fp32_source") or {}
    candidates = [int8_path.parent / source["name"]] if source.get("name") else []
    candidates += [Path(source["path"])] if source.get("path") else []
    for candidate in candidates:
        if candidate.is_file() and file_sha256(candidate) == source.get("sha256"):
            return candidate
    return None


def shipped_onnx_engine(model_path: Path, *, threads: int | None = None) -> OnnxEngine | None:
    """The bundled model's shipped export when ``model_path`` is the bundled model and the export
    was made from exactly this file (its ``source_sha256``); None otherwise."""
    if not BUNDLED_ONNX.is_file() or model_path.resolve() != artifact.BUNDLED_MODEL.resolve():
        return None
    sha = file_sha256(model_path)
    try:
        engine = OnnxEngine(BUNDLED_ONNX, source=model_path, sha256=sha, threads=threads)
    except UserError as exc:
        log.warning("the shipped %s is unreadable (%s); exporting %s instead", BUNDLED_ONNX, exc, model_path)
        return None
    if engine.document.get("source_sha256") != sha or engine.document.get("precision") != "fp32":
        log.warning("the shipped %s was not exported from this %s (rerun tools/export_bundled_onnx.py); "
                    "exporting it instead", BUNDLED_ONNX.name, model_path.name)
        return None
    return engine


def cached_onnx_engine(model_path: Path, *, threads: int | None = None) -> OnnxEngine:
    """Run ``model_path`` through its ONNX export, exporting it on first use."""
    sha = file_sha256(model_path)
    onnx_path = cache_dir() / "onnx" / f"{sha}.onnx"
    if onnx_path.is_file():
        try:
            engine = OnnxEngine(onnx_path, source=model_path, sha256=sha, threads=threads)
            if engine.document.get("source_sha256") == sha:
                log.debug("using cached ONNX export %s of %s", onnx_path, model_path)
                return engine
        except UserError:
            pass
        log.info("cached ONNX export %s is stale or unreadable; exporting again", onnx_path)
    from pneumoscan.inference.onnx_export import export_onnx  # torch and onnx: only on first use

    log.info("exporting %s to ONNX (once; cached at %s)", model_path, onnx_path)
    export_onnx(model_path, onnx_path)
    return OnnxEngine(onnx_path, source=model_path, sha256=sha, threads=threads)
