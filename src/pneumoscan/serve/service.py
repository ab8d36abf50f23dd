"""The model as the service holds it: scores from the inference engine, Grad-CAM from torch.

Loaded once, at startup, and then called by many requests at once. Decoding runs in parallel in
the threadpool; scoring goes through one FIFO queue (``serve.batcher``): a worker thread scores
micro-batches, a full queue answers 503 at once and no request waits past the stated limit. In
benchmarks/load_test.py this replaced requests taking turns on a lock, which let latency grow
without bound and gave no order (README, "Service load test"). Grad-CAM takes turns on its one
reusable ``explain.CamExplainer``: each map already uses the core it has, so parallel maps only
fight over the cores.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pneumoscan.modeling import artifact
from pneumoscan.safety import decision
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.inference.engines import Engine
from pneumoscan.inference.loading import load_engine
from pneumoscan.serve.batcher import BatchSettings, MicroBatcher, TimedOut

if TYPE_CHECKING:  # torch and Grad-CAM load only with a model.pt: an ONNX model serves without them
    import torch

    from pneumoscan.evaluation import explain

log = logging.getLogger(__name__)


def _row(v: "decision.Verdict") -> dict[str, Any]:
    return {"probability": v.probability, "logit": v.logit, "prediction": v.prediction, "label": v.label,
            "threshold": v.threshold, "flags": list(v.flags), "flag_details": list(v.details),
            "ood_score": v.ood_score, "chest_logit": v.chest_logit, "decided": v.decided}


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Service:
    def __init__(self, engine: Engine, cam_model: "torch.nn.Module | None",
                 batching: BatchSettings = BatchSettings()) -> None:
        self.engine = engine
        self.meta: ModelMeta = engine.meta
        self.cam_model = cam_model
        self.batching = batching
        self.batcher = MicroBatcher(self._score_now, batching)
        self.explainer = None
        if cam_model is not None:
            from pneumoscan.evaluation import explain

            self.explainer = explain.CamExplainer(cam_model, self.meta.architecture)

    def close(self) -> None:
        """Finish the queued requests and release the Grad-CAM hooks (at shutdown)."""
        self.batcher.close()
        if self.explainer is not None:
            self.explainer.close()

    @classmethod
    def load(cls, model_path: str | Path | None, kind: str = "auto",
             batching: BatchSettings = BatchSettings()) -> "Service":
        """The engine for scores; the PyTorch model too when there is one, for Grad-CAM."""
        engine = load_engine(model_path, kind)
        cam_model = getattr(engine, "model", None)  # the torch engine already holds it
        if cam_model is None and engine.path.suffix.lower() == ".pt":
            cam_model, _ = artifact.load(engine.path)
        if cam_model is None:
            log.warning("Grad-CAM disabled: %s is not a PyTorch model.pt", engine.path.name)
        log.info("model loaded: %s on %s (input %d px, threshold %.3f)", engine.meta.architecture,
                 engine.name, engine.meta.image_size, engine.meta.threshold)
        return cls(engine, cam_model, batching)

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

    def _score_now(self, images: np.ndarray) -> list[tuple[float, float, float]]:
        """(logit, OOD score, chest-film logit) per uint8 (N, H, W) image: the batcher's worker."""
        logits, ood, chest = self.engine.score_all(images)
        return list(zip(logits.tolist(), ood.tolist(), chest.tolist()))

    async def score(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """One row per image: probability, logit, label (or NOT_ASSESSED), threshold, flags and their
        sentences, as every command decides them (``inference.decision``); scored through the queue,
        gated here. Raises ``batcher.Busy`` when the queue is full and ``batcher.TimedOut`` past
        ``batching.timeout_s``."""
        future = self.batcher.submit(images)
        try:
            rows = await asyncio.wait_for(asyncio.wrap_future(future), self.batching.timeout_s)
        except asyncio.TimeoutError:  # wait_for cancelled the future: the worker will skip it
            raise TimedOut(f"not scored within {self.batching.timeout_s:g} s") from None
        logits, ood, chest = (np.array(column, dtype=np.float64) for column in zip(*rows))
        quality = decision.check_inputs(self.meta, images, sizes)
        return [_row(v) for v in decision.decide(self.meta, logits, ood, quality, chest_logits=chest)]

    def overlays(self, images: np.ndarray, prob=None) -> "list[explain.Explanation]":
        """A Grad-CAM explanation per image: the overlay PNG, its scale (absolute, i.e. weighted by
        ``prob``, when the probabilities are given), flatness and where the map's mass lies."""
        from pneumoscan.evaluation import explain

        cams = explain.compute_cams(self.cam_model, self.meta.architecture, images, explainer=self.explainer)
        return explain.explanations(images, cams, prob)
