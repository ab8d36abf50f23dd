"""Scoring unlabeled images: files or folders in, one row per image out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pneumoscan import imaging
from pneumoscan.inference.engines import Engine
from pneumoscan.inference.loading import load_engine


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float
    prediction: int
    label: str
    threshold: float
    model_sha256: str


def predict_files(model_path: str | Path | None, paths: Iterable[str | Path], *, threshold: float | None = None,
                  batch_size: int = 64, engine: str | Engine = "auto") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Returns (predictions, skipped) — unreadable files are reported, not fatal, so one bad file
    does not cost the rest of a worklist. ``engine``: a kind for ``inference.loading.load_engine``
    (auto, onnx, torch) or an engine already loaded (then ``model_path`` is ignored)."""
    if not isinstance(engine, Engine):
        engine = load_engine(model_path, engine)
    meta = engine.meta
    files = imaging.collect_files(paths)
    decoded = imaging.decode_many(files, meta.image_size, warn=False)  # the caller gets them all
    if not decoded.kept:
        return [], decoded.skipped
    prob = engine.predict_proba(decoded.images, batch_size)
    thr = meta.threshold if threshold is None else float(threshold)
    rows = [Prediction(str(files[i]), float(q), int(q >= thr), meta.label(float(q), thr), thr, engine.sha256)
            for i, q in zip(decoded.kept, prob)]
    return rows, decoded.skipped
