"""One inference interface over two runtimes: ONNX Runtime and PyTorch eager.

An ``Engine`` scores uint8 images at the model's size and names the file it came from (its
``sha256``), so every result can be traced to one model file whatever the runtime. ``loading``
chooses the engine for a file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from pneumoscan.inference.batching import check_images, spans, unit_interval
from pneumoscan.inference.onnx_format import CHEST_NAME, INPUT_NAME, OOD_NAME, OUTPUT_NAME, session_document

log = logging.getLogger(__name__)


def default_threads() -> int:
    """The CPUs this process may use (cgroup cpusets included), not the host's core count, which
    in a container would oversubscribe the few cores actually granted."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Engine:
    """A loaded model: ``meta``, ``predict_logits``/``predict_proba``, and where it came from.

    ``sha256`` is that of the file the caller named (the ``.pt`` even when a cached ONNX export
    runs it).
    """

    name: str
    meta: ModelMeta
    sha256: str
    path: Path  # the file the caller named

    def predict_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        return self.assess(images, batch_size)[0]

    def assess(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(logits, out-of-distribution scores), float32 (N,) each; the scores are NaN for a model
        fitted without an OOD detector."""
        return self.score_all(images, batch_size)[:2]

    def score_all(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, out-of-distribution scores, chest-film logits), float32 (N,) each, from one pass;
        NaN columns for a model without that detector. What ``safety.decision`` decides from."""
        raise NotImplementedError

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, H, W) at ``meta.image_size`` -> P(PNEUMONIA), float64 (N,), at the site's prior
        when the model was adapted (``ModelMeta.site_logits``)."""
        return metrics.sigmoid(self.meta.site_logits(self.predict_logits(images, batch_size)))

    def model_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(PNEUMONIA) as the file's graph computes it, without the prior offset: what
        tools/same_probabilities.py compares, since adapting a model (``pneumoscan adapt``) changes
        its meta, not its graph."""
        return metrics.sigmoid(self.predict_logits(images, batch_size))

    def _check(self, images: np.ndarray) -> np.ndarray:
        return check_images(images, self.meta.image_size, self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.path} sha256={self.sha256[:12]}>"


class TorchEngine(Engine):
    def __init__(self, path: str | Path):
        from pneumoscan.modeling import artifact

        self.path = Path(path)
        self.model, self.meta = artifact.load(self.path)
        self.sha256 = file_sha256(self.path)
        self.name = "torch"

    def score_all(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from pneumoscan.inference.torch_model import assess

        return assess(self.model, self._check(images), batch_size)


RUN_SIZE = 4  # images per session.run: larger runs fall out of the cache and get slower per image


class OnnxEngine(Engine):
    """ONNX Runtime on CPU. ``source``/``sha256`` name the ``.pt`` a cached export was made from.

    ``run_size``: the most images one ``session.run`` sees, whatever ``batch_size`` the caller
    asks for; with MobileNetV2 at 224 px, runs of 4 keep the activations in cache and measured
    flat img/s from batch 1 to 64, where one run of 32 was ~1.5x slower per image.
    ``spinning``: let ORT's idle threads busy-wait for work. Off by default: on shared or few
    cores a spinning thread takes the core another thread (or process) needs, which measured
    up to 2.5x slower at 2 threads; on dedicated cores it saves microseconds per run.
    """

    def __init__(self, onnx_path: str | Path, *, source: str | Path | None = None, sha256: str | None = None,
                 threads: int | None = None, run_size: int = RUN_SIZE, spinning: bool = False):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        self.run_size = int(run_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1  # a single chain of convolutions: nothing to run side by side
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's own warnings go to stderr, not through logging
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{self.onnx_path} is not a loadable ONNX model ({type(exc).__name__})") from None
        self.document = session_document(self.session, self.onnx_path)
        self.meta = ModelMeta.from_dict(self.document["meta"])
        self.path = Path(source) if source else self.onnx_path
        self.sha256 = sha256 or file_sha256(self.path)
        self.name = "onnxruntime-int8" if self.document.get("precision") == "int8" else "onnxruntime"

    def score_all(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = self._check(images)
        outputs = {o.name for o in self.session.get_outputs()}
        wanted = (OUTPUT_NAME, OOD_NAME, CHEST_NAME)
        names = [n for n in wanted if n in outputs]
        runs = [self.session.run(names, {INPUT_NAME: unit_interval(images[s])})
                for s in spans(len(images), min(batch_size, self.run_size))]
        columns = {n: np.concatenate([r[i] for r in runs]).astype(np.float32) if runs else np.zeros(0, np.float32)
                   for i, n in enumerate(names)}
        n = len(columns[OUTPUT_NAME])
        logits, ood, chest = (columns.get(name, np.full(n, np.nan, np.float32)) for name in wanted)
        return logits, ood, chest
