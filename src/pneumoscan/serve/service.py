"""The model as the service holds it: scores from the inference engine, Grad-CAM from torch.

Loaded once, at startup, and then called from the threadpool by many requests at once. Decoding
runs in parallel, but scoring takes turns behind a lock, and so does Grad-CAM behind another: each
run already uses every core, so parallel runs only fight over them. In one pair of runs of
benchmarks/load_test.py (32 clients, two busy cores): 40 rather than 37 requests/s, and a p99
latency of 1.4 s instead of 4.6 s. (Batching concurrent requests into one run was measured too: ONNX Runtime on CPU is no
faster per image in batches of 8-32 than one at a time, so it is not done.)
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pneumoscan import artifact, explain
from pneumoscan.artifact import ModelMeta
from pneumoscan.inference.engines import Engine
from pneumoscan.inference.loading import load_engine

log = logging.getLogger(__name__)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Service:
    def __init__(self, engine: Engine, cam_model: torch.nn.Module | None) -> None:
        self.engine = engine
        self.meta: ModelMeta = engine.meta
        self.cam_model = cam_model
        self._score_lock = threading.Lock()
        self._cam_lock = threading.Lock()

    @classmethod
    def load(cls, model_path: str | Path | None, kind: str = "auto") -> "Service":
        """The engine for scores; the PyTorch model too when there is one, for Grad-CAM."""
        engine = load_engine(model_path, kind)
        cam_model = getattr(engine, "model", None)  # the torch engine already holds it
        if cam_model is None and engine.path.suffix.lower() == ".pt":
            cam_model, _ = artifact.load(engine.path)
        if cam_model is None:
            log.warning("Grad-CAM disabled: %s is not a PyTorch model.pt", engine.path.name)
        log.info("model loaded: %s on %s (input %d px, threshold %.3f)", engine.meta.architecture,
                 engine.name, engine.meta.image_size, engine.meta.threshold)
        return cls(engine, cam_model)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @property
    def model_ref(self) -> dict[str, str]:
        """What every answer names as its source: enough to trace a score to one model file."""
        return {"name": self.meta.architecture, "version": self.meta.pneumoscan_version,
                "sha256": self.engine.sha256, "runtime": self.engine.name}

    @property
    def can_explain(self) -> bool:
        return self.cam_model is not None

    def score(self, images: np.ndarray) -> list[dict[str, Any]]:
        """One {probability, prediction, label, threshold} per uint8 (N, H, W) image."""
        with self._score_lock:
            prob = np.asarray(self.engine.predict_proba(images), dtype=np.float64).reshape(-1)
        thr = self.threshold
        return [{"probability": float(p), "prediction": int(p >= thr), "label": self.meta.label(float(p)),
                 "threshold": thr} for p in prob]

    def overlays(self, images: np.ndarray, prob=None) -> list[explain.Explanation]:
        """A Grad-CAM explanation per image: the overlay PNG, its scale (absolute, i.e. weighted by
        ``prob``, when the probabilities are given), flatness and where the map's mass lies."""
        with self._cam_lock:
            cams = explain.compute_cams(self.cam_model, self.meta.architecture, images)
        return explain.explanations(images, cams, prob)

