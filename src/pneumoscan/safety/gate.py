"""Input-quality gate: refuse images no chest film looks like, before the model sees them.

The classifier answers for any array it is given: a 1x1 PNG came back "PNEUMONIA 0.995", an
all-black image 0.968. A network cannot say "this is not an X-ray", so the cheap, explainable
checks happen here, in pure numpy, on what the decoder produced: the image's size *before*
resizing and the resized uint8 model input (224x224). An image that fails gets the code
``low_quality`` and one readable reason per failed check; the caller reports NOT_ASSESSED.

Limits (``QualityLimits()`` defaults; ``limits_table()`` returns them as data for a model card)
---------------------------------------------------------------------------------------------
Size limits are *reasoned*, not fitted: the shared training images were all resized to 224x224,
so their original sizes are not known here (the Kaggle originals are hundreds to ~2,900 px a side,
some landscape crops about 3:1).

* ``min_side = 64`` px (shorter side of the decoded image). The model input is 224 px; below
  64 px an image is upsampled more than 3.5x, one source pixel covers >5 mm of a 35 cm chest, and
  ribs and lung markings (the texture pneumonia changes) are no longer resolved. No radiography
  detector or PACS export is that small; thumbnails, icons and 1x1 tracking pixels are.
* ``max_aspect = 4.0`` (longer side / shorter side). Chest cassettes and detectors are 1:1 to
  17:14 (1.2); the Kaggle originals include tight landscape crops near 3:1. Squashing a 4:1 image
  to a square distorts the anatomy by 4x; strips, banners and text lines are what reach it.

Pixel-statistic limits were *fitted* on the 4,173 "fit" films of a patient-grouped 80/20 split
of the training folder (224x224 model inputs; ``benchmarks/ood.py`` prints the percentiles). Each
lower limit is half the 0.1st percentile, each upper limit twice the 99.9th percentile (rounded):
none of the fit films fails, and the margin leaves room for shifted films (a zoomed-out film with
a 36% black border, a noisy or JPEG-blocky one) while degenerate inputs are far beyond it; flagging a real film here cannot be undone by a better model, while a
borderline image still meets the OOD detector after this gate.

* ``min_std`` (grey-level standard deviation, 0-255): flat fields, blank or black/white images.
* ``min_entropy`` (bits, 256-bin histogram): images made of a handful of grey levels (icons,
  line art, binary masks, thresholded scans).
* ``max_dominant_fraction`` (share of pixels on the single most common grey level): uniform
  backgrounds or borders taking most of the image.
* ``max_saturated_fraction`` (share at 0 or 255): clipped or binarised images.
* ``max_roughness`` (mean absolute difference of neighbouring pixels / std): radiographs are
  smooth at 224 px; pixel noise, halftone and fine text are not.
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import asdict, dataclass, fields

import numpy as np

log = logging.getLogger(__name__)

CODE = "low_quality"


@dataclass(frozen=True)
class QualityLimits:
    """Defaults are the limits documented in the module docstring."""

    min_side: int = 64
    max_aspect: float = 4.0
    min_std: float = 12.26  # fit films: 0.1st pct 24.5, min 19.9, median 56.9
    min_entropy: float = 3.093  # bits; fit films: 0.1st pct 6.19, min 5.95, median 7.36
    max_dominant_fraction: float = 0.456  # fit films: 99.9th pct 0.228, max 0.290, median 0.026
    max_saturated_fraction: float = 0.457  # fit films: 99.9th pct 0.228, max 0.290, median 0.016
    max_roughness: float = 0.24  # fit films: 99.9th pct 0.120, max 0.133, median 0.067

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QualityLimits":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Flag:
    """One failed check: ``code`` for programs (``low_quality``), ``check`` names the limit,
    ``reason`` is the sentence a user sees."""

    code: str
    check: str
    reason: str


def image_stats(image: np.ndarray) -> dict[str, float]:
    """The statistics the limits apply to, for one uint8 (H, W) model input."""
    a = np.asarray(image)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) array, got {a.dtype} {a.shape}")
    f = a.astype(np.float32)
    hist = np.bincount(a.ravel(), minlength=256).astype(np.float64)
    p = hist / max(a.size, 1)
    nz = p[p > 0]
    std = float(f.std())
    diffs = []
    if a.shape[1] > 1:
        diffs.append(np.abs(np.diff(f, axis=1)).mean())
    if a.shape[0] > 1:
        diffs.append(np.abs(np.diff(f, axis=0)).mean())
    mad = float(np.mean(diffs)) if diffs else 0.0
    return {
        "std": std,
        "entropy": float(-(nz * np.log2(nz)).sum()),
        "dominant_fraction": float(p.max()),
        "saturated_fraction": float(p[0] + p[255]),
        "roughness": mad / std if std > 0 else 0.0,
    }


def check_quality(image: np.ndarray, original_size: tuple[int, int] | None = None,
                  limits: QualityLimits | None = None) -> list[Flag]:
    """Failed checks for one image, empty when it passes.

    ``image`` is the resized uint8 model input; ``original_size`` is (width, height) as decoded,
    before resizing (None: the input's own size), because a 1x1 PNG resized to 224 px is as
    smooth as a film.
    """
    lim = limits or QualityLimits()
    a = np.asarray(image)
    w, h = original_size if original_size is not None else (a.shape[1], a.shape[0])
    out: list[Flag] = []

    def fail(check: str, reason: str) -> None:
        out.append(Flag(CODE, check, reason))

    short, long_ = min(w, h), max(w, h)
    if short < lim.min_side:
        fail("min_side", f"image is {w}x{h} px; at least {lim.min_side} px a side is needed (a smaller image "
                         f"is upsampled over 3.5x to the model's 224 px and holds no lung detail; "
                         f"no radiograph is that small)")
    if short > 0 and long_ / short > lim.max_aspect:
        fail("max_aspect", f"image is {w}x{h} px, aspect ratio {long_ / short:.1f}:1; at most "
                           f"{lim.max_aspect:g}:1 is accepted (chest films are 1:1 to 1.2:1)")
    if a.size == 0:
        fail("empty", "image has no pixels")
        return out
    s = image_stats(a)
    if s["std"] < lim.min_std:
        fail("min_std", f"image is almost uniform (grey-level std {s['std']:.1f}; chest films have at "
                        f"least {lim.min_std:g})")
    if s["entropy"] < lim.min_entropy:
        fail("min_entropy", f"image has too few grey levels (entropy {s['entropy']:.2f} bits; chest films "
                            f"have at least {lim.min_entropy:g})")
    if s["dominant_fraction"] > lim.max_dominant_fraction:
        fail("max_dominant_fraction", f"{100 * s['dominant_fraction']:.0f}% of the image is one grey level "
                                      f"(chest films: at most {100 * lim.max_dominant_fraction:.0f}%)")
    if s["saturated_fraction"] > lim.max_saturated_fraction:
        fail("max_saturated_fraction", f"{100 * s['saturated_fraction']:.0f}% of pixels are pure black or "
                                       f"white (chest films: at most {100 * lim.max_saturated_fraction:.0f}%)")
    if s["roughness"] > lim.max_roughness:
        fail("max_roughness", f"image is noise-like or fine-patterned (roughness {s['roughness']:.2f}; "
                              f"chest films at most {lim.max_roughness:g})")
    if out:
        log.debug("quality gate: %s", "; ".join(f.check for f in out))
    return out


def summary(flags: list[Flag]) -> str:
    """One line for a CLI / API response."""
    return "; ".join(f.reason for f in flags)


def limits_table(limits: QualityLimits | None = None) -> list[dict[str, object]]:
    """The limits as rows (name, value, kind), e.g. for a model card."""
    lim = limits or QualityLimits()
    kinds = {"min_side": "reasoned", "max_aspect": "reasoned"}
    return [{"name": k, "value": v, "kind": kinds.get(k, "fitted on training films")}
            for k, v in lim.to_dict().items()]


def fit_limits(images: np.ndarray, *, min_side: int = 64, max_aspect: float = 4.0) -> tuple[QualityLimits, dict]:
    """Limits from training model inputs by the docstring's rule; also returns the percentiles."""
    stats = [image_stats(a) for a in images]
    cols = {k: np.array([s[k] for s in stats]) for k in stats[0]}
    pct = {k: {q: float(np.percentile(v, q)) for q in (0, 0.1, 1, 50, 99, 99.9, 100)} for k, v in cols.items()}

    def lower(k: str) -> float:
        return round(0.5 * pct[k][0.1], 3)

    def upper(k: str, cap: float | None = None) -> float:
        v = 2.0 * pct[k][99.9]
        return round(min(v, cap) if cap is not None else v, 3)

    lim = QualityLimits(min_side=min_side, max_aspect=max_aspect, min_std=lower("std"),
                        min_entropy=lower("entropy"), max_dominant_fraction=upper("dominant_fraction", 1.0),
                        max_saturated_fraction=upper("saturated_fraction", 1.0), max_roughness=upper("roughness"))
    return lim, pct


def default_limits(image_size: int = 224) -> QualityLimits:
    """``QualityLimits()`` for a model of another input size. The minimum side keeps its reason (no
    more than 3.5x upsampling to the model's input). Roughness is measured on the model input, and
    neighbouring pixels of a smaller input lie further apart on the film, so its limit grows as the
    input shrinks; the grey-level statistics do not depend on the size and stay as fitted."""
    scale = 224 / image_size
    base = QualityLimits()
    return dataclasses.replace(base, min_side=max(1, round(base.min_side / scale)),
                               max_roughness=round(base.max_roughness * max(scale, 1.0), 3))
