"""Scoring unlabeled images: files or folders in, one row per image out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pneumoscan import data
from pneumoscan.engine import Engine, load_engine
from pneumoscan.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float
    prediction: int
    label_name: str


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively) into image files; a missing path is a user error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in data.IMAGE_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise UserError(f"no images in {p} (looked for {', '.join(data.IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return files


def predict_files(model_path: str | Path | None, paths: Iterable[str | Path], *, threshold: float | None = None,
                  batch_size: int = 64, engine: str | Engine = "auto") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Returns (predictions, skipped) — unreadable files are reported, not fatal, so one bad file
    does not cost the rest of a worklist. ``engine``: a kind for ``engine.load_engine`` (auto, onnx,
    torch) or an engine already loaded (then ``model_path`` is ignored)."""
    if not isinstance(engine, Engine):
        engine = load_engine(model_path, engine)
    meta = engine.meta
    files = collect_files(paths)
    size = meta["image_size"]
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(data.load_image(f, size))
            kept.append(str(f))
        except data.ImageError as exc:
            skipped.append((str(f), str(exc)))
    if skipped:
        log.warning("skipped %d unreadable files: %s", len(skipped), ", ".join(p for p, _ in skipped[:10]))
    if not kept:
        return [], skipped
    prob = engine.predict_proba(np.stack(images), batch_size)
    thr = meta["threshold"] if threshold is None else threshold
    names = meta["class_names"]
    rows = [Prediction(p, float(q), int(q >= thr), names[int(q >= thr)]) for p, q in zip(kept, prob)]
    return rows, skipped
