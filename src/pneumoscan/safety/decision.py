"""From scores to what a reader is told: a label, or NOT_ASSESSED with the reason, and flags.

A screening aid that answers every upload is dangerous, so every image passes two checks beside
the classifier, and every command (predict, evaluate, the API and the page) reports them the same:

* the input-quality gate (``gate``): too small, too thin, near-constant or noise-like images get
  ``low_quality``;
* the out-of-distribution score of the model's own features (``ood``, a Mahalanobis distance
  fitted at training time): far from every training film gives ``not_chest_xray``; unusual but
  still plausibly a radiograph gives ``out_of_distribution``.

``not_chest_xray`` and ``low_quality`` mean the model is not competent for the image: the label
is NOT_ASSESSED (the probability is still returned, marked as not meaningful).
``out_of_distribution`` keeps the label and says that the image is unlike the training data.

An assessed image whose calibrated probability lies in the model's UNSURE band
(``ModelMeta.unsure``, Mondrian conformal prediction fitted on validation films) is labelled
UNSURE: its conformal prediction set is both classes (or none), so the model should not decide
it. ``prediction`` stays the threshold's class (metrics, the worklist order and the CSV still
use it) and ``decided`` is False. NOT_ASSESSED wins over UNSURE: a film the model is not
competent for has no meaningful band either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pneumoscan.safety import gate, ood
from pneumoscan.core import conformal, metrics
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.inference.engines import Engine

NOT_ASSESSED = "NOT_ASSESSED"
UNSURE = "UNSURE"
LOW_QUALITY, NOT_CHEST, OUT_OF_DISTRIBUTION = gate.CODE, ood.NOT_CHEST, ood.OOD
FLAGS = (NOT_CHEST, LOW_QUALITY, OUT_OF_DISTRIBUTION)
NOT_COMPETENT = (NOT_CHEST, LOW_QUALITY)  # the model's answer means nothing for such an image


@dataclass(frozen=True)
class Verdict:
    probability: float  # calibrated P(PNEUMONIA); not meaningful when not assessed
    logit: float
    label: str  # NORMAL | PNEUMONIA | UNSURE | NOT_ASSESSED
    prediction: int | None  # 1 if probability >= threshold, else 0 (UNSURE too); None when not assessed
    threshold: float
    flags: tuple[str, ...] = ()
    details: tuple[str, ...] = ()  # one sentence per flag, in the same order
    ood_score: float | None = None
    decided: bool = True  # False for UNSURE and NOT_ASSESSED: the model gives no class

    @property
    def assessed(self) -> bool:
        return self.label != NOT_ASSESSED


def unsure_band(meta: ModelMeta, threshold: float | None = None) -> tuple[float, float] | None:
    """The model's UNSURE band [low, high), widened to contain ``threshold`` when a caller
    overrides the model's (so decided films still agree with the threshold used); None without a band."""
    u = meta.unsure
    if not u:
        return None
    low, high = float(u["low"]), float(u["high"])
    return (low, high) if threshold is None else conformal.band_with_threshold(low, high, float(threshold))


def quality_limits(meta: ModelMeta) -> gate.QualityLimits:
    return gate.QualityLimits.from_dict(meta.quality) if meta.quality else gate.default_limits(meta.image_size)


def ood_sentence(code: str, score: float, meta: ModelMeta) -> str:
    o = meta.ood or {}
    if code == NOT_CHEST:
        return (f"far from every training radiograph (distance {score:.0f} > {o['cutoff_not_chest']:.0f}, which "
                f"{100 - o['percentile']:g}% of validation films exceed): probably not a frontal chest X-ray")
    return (f"unusual for the training films (distance {score:.0f} > {o['cutoff_ood']:.0f}, which "
            f"{100 - o['ood_percentile']:g}% of validation films exceed): check the image and read the score "
            "with care")


def ood_flag(meta: ModelMeta, score: float) -> str | None:
    o = meta.ood
    if o is None or not math.isfinite(score):
        return None
    if score > o["cutoff_not_chest"]:
        return NOT_CHEST
    return OUT_OF_DISTRIBUTION if score > o["cutoff_ood"] else None


def label_for(prob: float, threshold: float, flags: Sequence[str], band: tuple[float, float] | None,
              class_names: Sequence[str] = ("NORMAL", "PNEUMONIA")) -> str:
    """The label of one film: NOT_ASSESSED when a flag says the model is not competent for it,
    else UNSURE inside the band [low, high), else the threshold's class."""
    if any(f in NOT_COMPETENT for f in flags):
        return NOT_ASSESSED
    if band is not None and band[0] <= prob < band[1]:
        return UNSURE
    return class_names[int(prob >= threshold)]


def decide(meta: ModelMeta, logits: np.ndarray, ood_scores: np.ndarray, quality: Sequence[Sequence[gate.Flag]],
           threshold: float | None = None) -> list[Verdict]:
    """One Verdict per image from its logit (the engine's; ``meta.site_logits`` adds any prior
    offset), OOD score and failed quality checks."""
    thr = meta.threshold if threshold is None else float(threshold)
    band = unsure_band(meta, None if threshold is None else thr)
    logits = meta.site_logits(logits)
    out = []
    for z, p, s, failed in zip(logits, metrics.sigmoid(logits), np.asarray(ood_scores, dtype=np.float64), quality,
                               strict=True):
        p = float(p)
        flags, details = [], []
        code = ood_flag(meta, float(s))
        if code is not None:
            flags.append(code)
            details.append(ood_sentence(code, float(s), meta))
        if failed:
            flags.append(LOW_QUALITY)
            details.append(gate.summary(list(failed)))
        label = label_for(p, thr, flags, band, meta.class_names)
        prediction = None if label == NOT_ASSESSED else int(p >= thr)
        out.append(Verdict(p, float(z), label, prediction, thr, tuple(flags), tuple(details),
                           float(s) if math.isfinite(s) else None, decided=label not in (NOT_ASSESSED, UNSURE)))
    return out


def check_inputs(meta: ModelMeta, images: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[list[gate.Flag]]:
    """The quality gate's failed checks per decoded image (``sizes``: stored width and height)."""
    limits = quality_limits(meta)
    return [gate.check_quality(image, size, limits) for image, size in zip(images, sizes, strict=True)]


def assess(engine: Engine, images: np.ndarray, sizes: Sequence[tuple[int, int]], *, threshold: float | None = None,
           batch_size: int = 32) -> list[Verdict]:
    """Gate, score and decide decoded images."""
    logits, scores = engine.assess(images, batch_size)
    return decide(engine.meta, logits, scores, check_inputs(engine.meta, images, sizes), threshold)
