"""Acquisition shifts as a test: how a model's numbers move when the same patients are filmed elsewhere.

Cross-validation folds come from one archive, so they cannot see what differs between hospitals:
exposure curves, sharpening, noise, compression, resolution, framing, borders, burned-in text and
positioning. ``SUITE`` re-films held-out images each of those ways at two or three severities
(``shifts`` has the operations) and ``shift_table`` reports, per shift, ROC-AUC, accuracy,
sensitivity and specificity at the model's own threshold, specificity where sensitivity is 0.95
on that set, and ECE; ``worst_case`` is what a model choice is judged by. The severities are set
to look like films from other machines (a radiologist would still read them), not to destroy them.

``collection`` names the file-name series of the Kermany archive (``IM-``, ``NORMAL2-IM-``,
``person…``), the basis of the leave-one-collection-out protocol in ``benchmarks/robustness.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pneumoscan.core import calibration, metrics
from pneumoscan.modeling import shifts

log = logging.getLogger(__name__)

SENSITIVITY_TARGET = 0.95  # the screening operating point: a missed pneumonia costs most


@dataclass(frozen=True)
class Shift:
    kind: str  # what changes, e.g. "gamma"
    severity: int  # 1 mild ... 3 strong
    describe: str  # the setting, e.g. "gamma 1.6"
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # uint8 (H, W) -> same shape

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.severity}"


def sharpen(a: np.ndarray, percent: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.UnsharpMask(radius=2, percent=percent, threshold=0)))


def letterbox(a: np.ndarray, frac: float) -> np.ndarray:
    """Black bars left and right (``frac`` of the width), squeezed back to the size: a portrait
    film stored on a wider canvas, as some scanners and PACS exports do."""
    h, w = a.shape
    pad = int(w * frac / 2)
    wide = np.zeros((h, w + 2 * pad), dtype=np.uint8)
    wide[:, pad:pad + w] = a
    return np.asarray(Image.fromarray(wide).resize((w, h), Image.Resampling.BILINEAR))


def markers(a: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """A laterality marker and burned-in annotations, the marker ``frac`` of the width tall."""
    img = Image.fromarray(a.copy())
    d = ImageDraw.Draw(img)
    h, w = a.shape
    size, small = max(6, int(w * frac)), max(6, int(w * frac / 2))
    at = lambda lo, hi: int(rng.integers(lo, max(lo + 1, hi)))  # noqa: E731
    d.text((at(2, w // 5), at(2, h // 5)), "R", fill=255, font=ImageFont.load_default(size=size))
    d.text((at(w // 2, w - 5 * small), at(2, h // 6)), "PORTABLE", fill=255, font=ImageFont.load_default(size=small))
    d.text((at(2, w // 3), int(h - 1.5 * size)), "AP SUPINE 08:14", fill=255, font=ImageFont.load_default(size=small))
    return np.asarray(img)


def _s(kind: str, severity: int, describe: str, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Shift:
    return Shift(kind, severity, describe, fn)


SUITE: tuple[Shift, ...] = (
    _s("gamma", 1, "gamma 0.7", lambda a, r: shifts.gamma(a, 0.7)),
    _s("gamma", 2, "gamma 1.5", lambda a, r: shifts.gamma(a, 1.5)),
    _s("contrast", 1, "contrast x0.7", lambda a, r: shifts.contrast(a, 0.7)),
    _s("contrast", 2, "contrast x1.4", lambda a, r: shifts.contrast(a, 1.4)),
    _s("exposure", 1, "brightness +25", lambda a, r: shifts.contrast(a, 1.0, 25)),
    _s("exposure", 2, "brightness -25", lambda a, r: shifts.contrast(a, 1.0, -25)),
    _s("blur", 1, "Gaussian blur sigma 1", lambda a, r: shifts.blur(a, 1.0)),
    _s("blur", 2, "Gaussian blur sigma 2", lambda a, r: shifts.blur(a, 2.0)),
    _s("sharpen", 1, "unsharp mask 150%", lambda a, r: sharpen(a, 150)),
    _s("sharpen", 2, "unsharp mask 300%", lambda a, r: sharpen(a, 300)),
    _s("noise", 1, "Gaussian noise sigma 5", lambda a, r: shifts.noise(a, 5, r)),
    _s("noise", 2, "Gaussian noise sigma 12", lambda a, r: shifts.noise(a, 12, r)),
    _s("jpeg", 1, "JPEG quality 30", lambda a, r: shifts.jpeg(a, 30)),
    _s("jpeg", 2, "JPEG quality 10", lambda a, r: shifts.jpeg(a, 10)),
    _s("resolution", 1, "down x0.5 and up", lambda a, r: shifts.resample(a, 0.5)),
    _s("resolution", 2, "down x0.25 and up", lambda a, r: shifts.resample(a, 0.25)),
    _s("zoom-in", 1, "central 85% crop", lambda a, r: shifts.crop_zoom(a, 0.85)),
    _s("zoom-in", 2, "central 70% crop", lambda a, r: shifts.crop_zoom(a, 0.70)),
    _s("zoom-out", 1, "shrunk to 85%, black border", lambda a, r: shifts.zoom_out(a, 0.85, 0)),
    _s("zoom-out", 2, "shrunk to 70%, black border", lambda a, r: shifts.zoom_out(a, 0.70, 0)),
    _s("zoom-out", 3, "shrunk to 80%, white border", lambda a, r: shifts.zoom_out(a, 0.80, 255)),
    _s("letterbox", 1, "bars of 20% of the width", lambda a, r: letterbox(a, 0.2)),
    _s("markers", 1, "marker 6% of the width + text", lambda a, r: markers(a, r, 0.06)),
    _s("markers", 2, "marker 12% of the width + text", lambda a, r: markers(a, r, 0.12)),
    _s("rotation", 1, "rotated 5 degrees", lambda a, r: shifts.rotate(a, 5)),
    _s("rotation", 2, "rotated -10 degrees", lambda a, r: shifts.rotate(a, -10)),
)


def apply(shift: Shift, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W) uint8 re-filmed by ``shift``; random parts (noise, marker places) are
    seeded per image, so every model sees the same shifted films."""
    return np.stack([shift.apply(a, np.random.default_rng([seed, i])) for i, a in enumerate(images)])


def rates(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """The numbers a shift is judged by (see the module docstring)."""
    m = metrics.binary_metrics(y, prob, threshold)
    both = len(set(y.tolist())) == 2
    return {"n": int(len(y)), "roc_auc": m["roc_auc"], "accuracy": m["accuracy"], "sensitivity": m["recall"],
            "specificity": m["specificity"],
            "specificity_at_sens95": specificity_at(y, prob, SENSITIVITY_TARGET) if both else math.nan,
            "ece": metrics.expected_calibration_error(y, prob)}


def specificity_at(y: np.ndarray, prob: np.ndarray, sensitivity: float) -> float:
    """Specificity at the highest cut-off whose sensitivity on (y, prob) reaches ``sensitivity``:
    how well the ranking holds up, whatever threshold a site would set."""
    cut = calibration.choose_threshold(y, prob, f"sensitivity:{sensitivity}")
    normals = prob[y == 0]
    return float((normals < cut).mean()) if len(normals) else math.nan


def shift_table(score: Callable[[np.ndarray], np.ndarray], images: np.ndarray, y: Sequence[int], threshold: float,
                *, suite: Sequence[Shift] = SUITE, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per shift (first the unshifted films), ``score`` mapping uint8 images to P(PNEUMONIA)."""
    y = np.asarray(y)
    rows = [{"shift": "none", "kind": "none", "severity": 0, "setting": "as stored"} |
            rates(y, np.asarray(score(images)), threshold)]
    for k, shift in enumerate(suite):
        prob = np.asarray(score(apply(shift, images, seed)))
        rows.append({"shift": shift.name, "kind": shift.kind, "severity": shift.severity, "setting": shift.describe}
                    | rates(y, prob, threshold))
        if progress:
            progress(k + 1, len(suite))
    return rows


def worst_case(rows: Sequence[dict]) -> dict[str, float]:
    """The worst value of each number over the shifted rows (highest ECE, lowest of the rest),
    with the mean beside it."""
    shifted = [r for r in rows if r["shift"] != "none"]
    out: dict[str, float] = {}
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "specificity_at_sens95", "ece"):
        values = np.array([r[key] for r in shifted], dtype=float)
        out[f"worst_{key}"] = float(np.nanmax(values) if key == "ece" else np.nanmin(values))
        out[f"mean_{key}"] = float(np.nanmean(values))
    return out


def collection(path: str | Path) -> str:
    """The Kermany archive's file-name series: "IM", "NORMAL2" (normals) or "person" (pneumonia)."""
    stem = Path(path).name.upper()
    if stem.startswith("NORMAL2-"):
        return "NORMAL2"
    if stem.startswith("IM-"):
        return "IM"
    return "person" if stem.startswith("PERSON") else "other"


def markdown(rows: Sequence[dict], title: str = "") -> str:
    """A table of ``shift_table`` rows for a report."""
    head = "| shift | setting | n | ROC-AUC | accuracy | sensitivity | specificity | spec. @ sens 0.95 | ECE |"
    lines = ([f"### {title}", ""] if title else []) + [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['shift']} | {r['setting']} | {r['n']} | {r['roc_auc']:.3f} | {r['accuracy']:.3f} | "
                     f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['specificity_at_sens95']:.3f} | "
                     f"{r['ece']:.3f} |")
    return "\n".join(lines) + "\n"


def run(model_path: str | Path | None, data_root: str | Path, out_dir: str | Path, *, split: str | None = None,
        engine: str = "auto", strict: bool = False, seed: int = 0,
        progress: Callable[[int, int], None] | None = None) -> dict:
    """The shift suite on a site's own labelled films: how far each acquisition change moves the
    model's numbers at its own threshold. Writes OUT/robustness.json and OUT/robustness.md."""
    from pneumoscan.io import data
    from pneumoscan.evaluation.evaluate import select_split, training_overlap
    from pneumoscan.core.files import write_json, write_text
    from pneumoscan.inference.loading import load_engine

    scorer = load_engine(model_path, engine)
    samples = select_split(data.scan(data_root, default_split="test"), split)
    kept, images, skipped = data.load_images(samples, scorer.meta.image_size, strict=strict)
    y = np.array([s.label for s in kept])
    if len(set(y.tolist())) < 2:
        from pneumoscan.core.errors import UserError

        raise UserError(f"{data_root}: the shift suite needs NORMAL and PNEUMONIA images")
    rows = shift_table(lambda a: scorer.predict_proba(a, 64), images, y, scorer.meta.threshold, seed=seed,
                       progress=progress)
    overlap = training_overlap(scorer.meta, [s.path for s in kept])
    result = {"model": str(scorer.path), "model_sha256": scorer.sha256, "runtime": scorer.name, "data": str(data_root),
              "n_images": len(kept), "n_skipped": len(skipped), "threshold": scorer.meta.threshold, **overlap,
              "rows": rows, "worst_case": worst_case(rows)}
    out = Path(out_dir)
    write_json(out / "robustness.json", result)
    note = ("" if not overlap.get("n_in_training_data") else
            f"\n{overlap['n_in_training_data']} of these {len(kept)} images were in the model's training data: "
            "every number is optimistic.\n")
    write_text(out / "robustness.md",
               f"# Acquisition shifts: {data_root}\n\nModel {scorer.path} (sha256 {scorer.sha256[:12]}), threshold "
               f"{scorer.meta.threshold:.4f} (the model's own), {len(kept)} images ({int(y.sum())} PNEUMONIA). "
               "Each row re-films every image one way; ROC-AUC, accuracy, sensitivity and specificity at the "
               "threshold, specificity where sensitivity is 0.95 on that set, and ECE (15 bins).\n"
               f"{note}\n" + markdown(rows))
    log.info("shift suite on %d images: worst specificity %.3f, worst ROC-AUC %.3f", len(kept),
             result["worst_case"]["worst_specificity"], result["worst_case"]["worst_roc_auc"])
    return result
