"""From scores to what a reader is told: a label, or NOT_ASSESSED with the reason, and flags.

A screening aid that answers every upload is dangerous, so every image passes three checks beside
the classifier, and every face (predict CSV, evaluate, the API, the page, the report, the DICOM SR
built from a Verdict, the model card) reports them with the same codes and sentences, defined here
only (``SENTENCES``):

* the input-quality gate (``gate``): too small, too thin, near-constant or noise-like images get
  ``low_quality``;
* the chest-film detector (``chest``, a logistic regression on generic image features, fitted on
  chest films of children *and* adults against other radiographs and non-radiographs): below its
  cut-off gives ``not_chest_xray``, "probably not a frontal chest X-ray";
* the Mahalanobis distance of the model's own features from its training films (``ood``): above
  the far cut-off gives ``outside_training_population`` (a frontal chest film unlike the training
  films, e.g. an adult's: the model is not validated for it); above the near cut-off only
  ``out_of_distribution`` (unusual, read with care).

Two questions, two answers: "is it a chest film?" and "is it like the films the model learnt
from?". An adult's frontal film is a chest film far from Guangzhou's children: it must be told
the second, never the first. A model without a chest-film detector (older files) cannot tell the
two apart, so a far distance there gives ``outside_training_population`` with a sentence that says
so (``SENTENCE_NO_DETECTOR``).

``not_chest_xray`` and ``low_quality`` mean the model is not competent for the image: the label
is NOT_ASSESSED (the probability is still returned, marked as not meaningful).
``outside_training_population`` is NOT_ASSESSED too by default: the model has never been
validated on such films (on adult normals it called most PNEUMONIA). A site that validated the
model on its own films may downgrade it to a warning (policy ``warn``: the label is given, the
flag and its sentence stay): ``pneumoscan predict/evaluate/serve --outside-population warn`` or
the environment variable ``PNEUMOSCAN_OUTSIDE_POPULATION=warn`` (read by every face, the node too).
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
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pneumoscan.safety import chest, gate, ood
from pneumoscan.core import conformal, metrics
from pneumoscan.core.errors import UserError
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.inference.engines import Engine

NOT_ASSESSED = "NOT_ASSESSED"
UNSURE = "UNSURE"
LOW_QUALITY, NOT_CHEST, OUT_OF_DISTRIBUTION = gate.CODE, chest.CODE, ood.OOD
OUTSIDE_POPULATION = "outside_training_population"
FLAGS = (NOT_CHEST, OUTSIDE_POPULATION, LOW_QUALITY, OUT_OF_DISTRIBUTION)
NOT_COMPETENT = (NOT_CHEST, LOW_QUALITY, OUTSIDE_POPULATION)  # the default policy's NOT_ASSESSED flags

# The one sentence each flag means, on every face (the numbers behind it follow in the details).
SENTENCES = {
    NOT_CHEST: "probably not a frontal chest X-ray",
    OUTSIDE_POPULATION: "a frontal chest film unlike the training films (e.g. an adult's): the model is not "
                        "validated for it",
    OUT_OF_DISTRIBUTION: "unusual for the training films: check the image and read the score with care",
    LOW_QUALITY: "the image fails the input-quality checks",
}
SENTENCE_NO_DETECTOR = ("unlike every training film (this model has no chest-film detector to tell whether it is a "
                        "chest X-ray at all): the model is not validated for it")
WARNED = "shown anyway: this site validated the model on its own films"

POLICY_ENV = "PNEUMOSCAN_OUTSIDE_POPULATION"
POLICIES = ("not_assessed", "warn")  # what outside_training_population does to the label


def outside_policy(value: str | None = None) -> str:
    """The policy for ``outside_training_population``: ``value``, else the environment's, else
    ``not_assessed``; a bad value is a UserError naming the valid ones."""
    v = (value if value is not None else os.environ.get(POLICY_ENV) or "not_assessed").strip().lower()
    v = v.replace("-", "_")
    if v not in POLICIES:
        raise UserError(f"outside-population policy {v!r}: use one of {', '.join(POLICIES)}")
    return v


def not_competent(policy: str | None = None) -> tuple[str, ...]:
    """The flags that make the label NOT_ASSESSED under ``policy`` (``outside_policy``)."""
    return NOT_COMPETENT if outside_policy(policy) == "not_assessed" else (NOT_CHEST, LOW_QUALITY)


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
    chest_logit: float | None = None  # the chest-film detector's logit; None without a detector

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


def ood_sentence(code: str, score: float, meta: ModelMeta, detector: bool | None = None) -> str:
    """The flag's sentence and the distance behind it. ``detector``: whether a chest-film logit
    was there to rule out a non-chest image (default: whether the model has a detector)."""
    o = meta.ood or {}
    if code == OUTSIDE_POPULATION:
        head = SENTENCES[code] if (bool(meta.chest) if detector is None else detector) else SENTENCE_NO_DETECTOR
        return (f"{head} (distance {score:.0f} from the training films > {o['cutoff_not_chest']:.0f}, which "
                f"{100 - o['percentile']:g}% of validation films exceed)")
    return (f"{SENTENCES[code]} (distance {score:.0f} > {o['cutoff_ood']:.0f}, which "
            f"{100 - o['ood_percentile']:g}% of validation films exceed)")


def chest_sentence(logit: float, meta: ModelMeta) -> str:
    return (f"{SENTENCES[NOT_CHEST]} (chest-film detector logit {logit:.2f} < cut-off {meta.chest['cutoff']:.2f}, "
            "fitted on frontal chest films of children and adults against other radiographs and non-radiographs)")


def ood_flag(meta: ModelMeta, score: float) -> str | None:
    o = meta.ood
    if o is None or not math.isfinite(score):
        return None
    if score > o["cutoff_not_chest"]:
        return OUTSIDE_POPULATION
    return OUT_OF_DISTRIBUTION if score > o["cutoff_ood"] else None


def input_flags(meta: ModelMeta, score: float, chest_logit: float, failed: Sequence[gate.Flag],
                policy: str) -> tuple[list[str], list[str]]:
    """(flags, sentences) of one image. Not a chest film: that flag alone (its distance from the
    training films says nothing more); otherwise the distance's flag, if any."""
    flags, details = [], []
    is_chest = chest.is_chest(meta.chest, chest_logit)
    if is_chest is False:
        flags.append(NOT_CHEST)
        details.append(chest_sentence(float(chest_logit), meta))
    else:
        code = ood_flag(meta, score)
        if code is not None:
            flags.append(code)
            sentence = ood_sentence(code, score, meta, detector=is_chest is not None)
            details.append(f"{sentence}; {WARNED}" if code == OUTSIDE_POPULATION and policy == "warn" else sentence)
    if failed:
        flags.append(LOW_QUALITY)
        details.append(gate.summary(list(failed)))
    return flags, details


def label_for(prob: float, threshold: float, flags: Sequence[str], band: tuple[float, float] | None,
              class_names: Sequence[str] = ("NORMAL", "PNEUMONIA"), policy: str | None = None) -> str:
    """The label of one film: NOT_ASSESSED when a flag says the model is not competent for it (under
    ``policy``, ``outside_policy``'s), else UNSURE inside the band [low, high), else the threshold's class."""
    if any(f in not_competent(policy) for f in flags):
        return NOT_ASSESSED
    if band is not None and band[0] <= prob < band[1]:
        return UNSURE
    return class_names[int(prob >= threshold)]


def decide(meta: ModelMeta, logits: np.ndarray, ood_scores: np.ndarray, quality: Sequence[Sequence[gate.Flag]],
           threshold: float | None = None, chest_logits: np.ndarray | None = None,
           policy: str | None = None) -> list[Verdict]:
    """One Verdict per image from its logit (the engine's; ``meta.site_logits`` adds any prior
    offset), OOD score, chest-film logit (None or NaN: no detector) and failed quality checks.
    ``policy`` for ``outside_training_population``: ``outside_policy``'s (default: the environment's)."""
    policy = outside_policy(policy)
    thr = meta.threshold if threshold is None else float(threshold)
    band = unsure_band(meta, None if threshold is None else thr)
    logits = meta.site_logits(logits)
    chest_logits = np.full(len(logits), np.nan) if chest_logits is None else np.asarray(chest_logits, np.float64)
    out = []
    for z, p, s, c, failed in zip(logits, metrics.sigmoid(logits), np.asarray(ood_scores, dtype=np.float64),
                                  chest_logits, quality, strict=True):
        p = float(p)
        flags, details = input_flags(meta, float(s), float(c), failed, policy)
        label = label_for(p, thr, flags, band, meta.class_names, policy)
        prediction = None if label == NOT_ASSESSED else int(p >= thr)
        out.append(Verdict(p, float(z), label, prediction, thr, tuple(flags), tuple(details),
                           float(s) if math.isfinite(s) else None, decided=label not in (NOT_ASSESSED, UNSURE),
                           chest_logit=float(c) if math.isfinite(c) else None))
    return out


def check_inputs(meta: ModelMeta, images: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[list[gate.Flag]]:
    """The quality gate's failed checks per decoded image (``sizes``: stored width and height)."""
    limits = quality_limits(meta)
    return [gate.check_quality(image, size, limits) for image, size in zip(images, sizes, strict=True)]


def assess(engine: Engine, images: np.ndarray, sizes: Sequence[tuple[int, int]], *, threshold: float | None = None,
           batch_size: int = 32, policy: str | None = None) -> list[Verdict]:
    """Gate, score and decide decoded images."""
    logits, scores, chest_logits = engine.score_all(images, batch_size)
    return decide(engine.meta, logits, scores, check_inputs(engine.meta, images, sizes), threshold, chest_logits,
                  policy)
