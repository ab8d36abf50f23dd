"""Scoring unlabeled images: files or folders in, one row per image out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pneumoscan.io import imaging
from pneumoscan.safety.decision import Verdict, assess
from pneumoscan.inference.engines import Engine
from pneumoscan.inference.loading import load_engine


@dataclass(frozen=True)
class Prediction(Verdict):
    """A Verdict for one file, and the model file that gave it."""

    path: str = ""
    model_sha256: str = ""


def predict_files(model_path: str | Path | None, paths: Iterable[str | Path], *, threshold: float | None = None,
                  batch_size: int = 64, engine: str | Engine = "auto") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Returns (predictions, skipped) — unreadable files are reported, not fatal, so one bad file
    does not cost the rest of a worklist. Images the model is not competent for come back as
    NOT_ASSESSED with their flags (``inference.decision``). ``engine``: a kind for
    ``inference.loading.load_engine`` (auto, onnx, torch) or an engine already loaded (then
    ``model_path`` is ignored)."""
    if not isinstance(engine, Engine):
        engine = load_engine(model_path, engine)
    files = imaging.collect_files(paths)
    decoded = imaging.decode_many(files, engine.meta.image_size, warn=False)  # the caller gets them all
    if not decoded.kept:
        return [], decoded.skipped
    verdicts = assess(engine, decoded.images, decoded.sizes, threshold=threshold, batch_size=batch_size)
    rows = [Prediction(**vars(v), path=str(files[i]), model_sha256=engine.sha256)
            for i, v in zip(decoded.kept, verdicts)]
    return rows, decoded.skipped
