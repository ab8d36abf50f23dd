"""One inference interface over two runtimes: ONNX Runtime (the default) and PyTorch eager.

``predict`` and the service call ``load_engine`` and never care which runtime answers. A ``.onnx``
file runs in ONNX Runtime. A ``model.pt`` is exported to ONNX once, cached under the user's cache
folder by the file's sha256 (so a retrained model never reuses a stale export), and run there:
ONNX Runtime starts faster, uses less memory and is quicker on CPU than eager PyTorch. Any export
failure falls back to PyTorch with a warning, because a slower answer beats none; ``kind="torch"``
forces PyTorch (Grad-CAM needs it anyway, and it is the reference the export is checked against).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from pneumoscan import artifact, metrics
from pneumoscan.errors import UserError
from pneumoscan.models import file_sha256

log = logging.getLogger(__name__)

KINDS = ("auto", "onnx", "torch")
METADATA_KEY = "pneumoscan"  # ONNX metadata_props key holding the JSON document below
ONNX_FORMAT = "pneumoscan-onnx/1"  # {"format", "meta", "source_sha256", "precision", ...}
INPUT_NAME, OUTPUT_NAME = "image", "logit"


def cache_dir() -> Path:
    """``$PNEUMOSCAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pneumoscan``, else ``~/.cache/pneumoscan``."""
    if os.environ.get("PNEUMOSCAN_CACHE_DIR"):
        return Path(os.environ["PNEUMOSCAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumoscan"


def default_threads() -> int:
    """The CPUs this process may use (cgroup cpusets included), not the host's core count, which
    in a container would oversubscribe the few cores actually granted."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Engine:
    """A loaded model: ``meta`` (the artifact's meta), ``predict_proba``, and where it came from.

    ``sha256`` is that of the file the caller named (the ``.pt`` even when a cached ONNX export
    runs it), so results can be traced to a model file whatever the runtime.
    """

    name: str
    meta: dict
    sha256: str
    path: Path  # the file the caller named

    def predict_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, H, W) at ``meta["image_size"]`` -> P(PNEUMONIA), float64 (N,)."""
        return metrics.sigmoid(self.predict_logits(images, batch_size))

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        size = self.meta["image_size"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"{self.name} expects uint8 images (N, {size}, {size}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        return images

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.path} sha256={self.sha256[:12]}>"


class TorchEngine(Engine):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model, self.meta = artifact.load(self.path)
        self.sha256 = file_sha256(self.path)
        self.name = "torch"

    def predict_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        from pneumoscan import evaluate

        return evaluate.predict_logits(self.model, self._check(images), batch_size)


class OnnxEngine(Engine):
    """ONNX Runtime on CPU. ``source``/``sha256`` name the ``.pt`` a cached export was made from."""

    def __init__(self, onnx_path: str | Path, *, source: str | Path | None = None, sha256: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1  # a single chain of convolutions: nothing to run side by side
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's own warnings go to stderr, not through logging
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{self.onnx_path} is not a loadable ONNX model ({type(exc).__name__})") from None
        self.document = read_metadata(self.session, self.onnx_path)
        self.meta = self.document["meta"]
        self.path = Path(source) if source else self.onnx_path
        self.sha256 = sha256 or file_sha256(self.path)
        self.name = "onnxruntime-int8" if self.document.get("precision") == "int8" else "onnxruntime"

    def predict_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        images = self._check(images)
        out = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size, None].astype(np.float32) / np.float32(255)
            out.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)


def read_metadata(session, path: str | Path) -> dict:
    """The pneumoscan document stored in an ONNX file's metadata_props (see ``export``)."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        doc = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != ONNX_FORMAT or "meta" not in doc:
        raise UserError(f"{path} is not a pneumoscan ONNX model (no {METADATA_KEY!r} metadata of format "
                        f"{ONNX_FORMAT}); export one with 'pneumoscan export'")
    return doc


def load_engine(path: str | Path | None = None, kind: str = "auto", *, threads: int | None = None) -> Engine:
    """The model at ``path`` (default: the bundled one) ready to score images.

    kind: ``auto`` (ONNX Runtime, via a cached export for ``.pt``; PyTorch if that fails),
    ``onnx`` (ONNX Runtime or an error) or ``torch`` (PyTorch eager; ``.pt`` only).
    """
    if kind not in KINDS:
        raise UserError(f"unknown engine {kind!r}; choose one of: {', '.join(KINDS)}")
    path = artifact.resolve(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        if kind == "torch":
            raise UserError(f"{path} is an ONNX model; the torch engine needs a model.pt")
        return OnnxEngine(path, threads=threads)
    if kind == "torch":
        return TorchEngine(path)
    try:
        return cached_onnx_engine(path, threads=threads)
    except UserError as exc:
        from pneumoscan.export import ExportError

        if kind == "onnx" or not isinstance(exc, ExportError):
            raise  # a file that is not a model fails the same way in PyTorch: say so once
        reason = str(exc)
    except Exception as exc:  # an exporter or runtime limitation, not the user's mistake
        if kind == "onnx":
            raise UserError(f"cannot run {path} with ONNX Runtime ({type(exc).__name__}: {exc})") from exc
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("ONNX export of %s failed (%s); running it with PyTorch instead", path, reason)
    return TorchEngine(path)


def cached_onnx_engine(model_path: Path, *, threads: int | None = None) -> OnnxEngine:
    """Run ``model_path`` through its ONNX export, exporting it on first use."""
    from pneumoscan import export

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
    log.info("exporting %s to ONNX (once; cached at %s)", model_path, onnx_path)
    export.export_onnx(model_path, onnx_path)
    return OnnxEngine(onnx_path, source=model_path, sha256=sha, threads=threads)
