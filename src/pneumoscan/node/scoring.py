"""Scoring spooled films exactly as ``pneumoscan predict`` does, plus Grad-CAM for the SC.

Decoding goes through ``io.imaging.read`` (THE decoding policy: Modality LUT, VOI, MONOCHROME1,
limits) at the model's input size, and verdicts through ``safety.decision.assess``: the same
bytes give the same probability, label and flags as ``pneumoscan predict FILE``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ImageError
from pneumoscan.inference.engines import Engine
from pneumoscan.inference.loading import load_engine
from pneumoscan.io import imaging
from pneumoscan.node.results import Algorithm
from pneumoscan.safety import decision

log = logging.getLogger(__name__)

SC_SIZE = 512  # the SC's picture: the model's input upscaled so the caption and map are legible


@dataclass
class Decoded:
    images: np.ndarray
    sizes: list[tuple[int, int]]
    kept: list[int]  # indexes into the paths given
    failed: dict[int, str]  # index -> reason


class Scorer:
    def __init__(self, engine: Engine, threshold: float | None = None, with_cam: bool = False) -> None:
        self.engine = engine
        self.threshold = threshold
        meta = engine.meta
        self.algorithm = Algorithm(meta.architecture, meta.pneumoscan_version, engine.sha256)
        self.cam_model = None
        self.explainer = None
        if with_cam:
            self._load_cam()

    @classmethod
    def load(cls, model: str | None, kind: str = "auto", threshold: float | None = None,
             with_cam: bool = False) -> "Scorer":
        return cls(load_engine(model, kind), threshold, with_cam)

    def _load_cam(self) -> None:
        from pneumoscan.evaluation import explain
        from pneumoscan.modeling import artifact

        model = getattr(self.engine, "model", None)
        if model is None and self.engine.path.suffix.lower() == ".pt":
            model, _ = artifact.load(self.engine.path)
        if model is None:
            log.warning("--secondary-capture needs a PyTorch model.pt for Grad-CAM; no SC will be made")
            return
        self.cam_model = model
        self.explainer = explain.CamExplainer(model, self.engine.meta.architecture)

    def decode(self, paths: list[Path]) -> Decoded:
        size = self.engine.meta.image_size
        images, sizes, kept, failed = [], [], [], {}
        for i, path in enumerate(paths):
            try:
                picture = imaging.read(path, size)
            except ImageError as exc:
                failed[i] = f"unreadable: {exc.reason}"
                continue
            images.append(picture.pixels)
            sizes.append((picture.width, picture.height))
            kept.append(i)
        stack = np.stack(images) if images else np.empty((0, size, size), np.uint8)
        return Decoded(stack, sizes, kept, failed)

    def assess(self, decoded: Decoded) -> list[decision.Verdict]:
        if not decoded.kept:
            return []
        return decision.assess(self.engine, decoded.images, decoded.sizes, threshold=self.threshold)

    def overlays(self, images: np.ndarray, verdicts: list[decision.Verdict]) -> list[np.ndarray] | None:
        """RGB (SC_SIZE, SC_SIZE, 3) Grad-CAM overlays on the absolute scale, or None without a model."""
        if self.explainer is None or not len(images):
            return None
        from PIL import Image

        from pneumoscan.evaluation import explain

        cams = explain.compute_cams(self.cam_model, self.engine.meta.architecture, images, explainer=self.explainer)
        out = []
        for image, cam, v in zip(images, cams, verdicts):
            shown = np.zeros_like(cam) if explain.is_flat(cam) else explain.scale_cam(cam, v.probability)
            rgb = explain.overlay(image, shown)
            out.append(np.asarray(Image.fromarray(rgb).resize((SC_SIZE, SC_SIZE), Image.Resampling.BILINEAR)))
        return out

    def close(self) -> None:
        if self.explainer is not None:
            self.explainer.close()
