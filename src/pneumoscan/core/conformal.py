"""Selective classification: the UNSURE band of Mondrian split conformal prediction.

A film whose calibrated probability falls in the band is answered UNSURE rather than forced into
a class; ``conformal_band`` fits the band on validation, ``in_band`` applies it. crepes is
imported inside the function that uses it.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pneumoscan.core.errors import UserError
from pneumoscan.core.metrics import _arrays

log = logging.getLogger(__name__)


def _conformal_quantile(alphas_cal: np.ndarray, confidence: float) -> float:
    """The largest nonconformity score that crepes' (unsmoothed) conformal classifier still
    accepts at ``confidence`` against ``alphas_cal``; +inf when it accepts every score (too few
    calibration scores for that confidence: with n of them the smallest p-value is 1 / (n + 1)).

    Asked of crepes itself: acceptance is monotone in the score and only changes at calibration
    scores, so probing those (and one score above them all) finds the boundary exactly."""
    from crepes import ConformalClassifier

    cc = ConformalClassifier().fit(alphas_cal)
    probes = np.r_[np.unique(alphas_cal), alphas_cal.max() + 1.0]
    accepted = cc.predict_set(probes, confidence=confidence, smoothing=False).astype(bool)
    if accepted[-1]:
        return math.inf
    return float(probes[:-1][accepted[:-1]].max())


def conformal_band(y_true, prob, confidence: float, threshold: float) -> dict:
    """The UNSURE band [low, high) of Mondrian (class-conditional) split conformal prediction.

    Nonconformity is 1 - P(true class) (``prob`` calibrated), each class calibrated on its own
    films (crepes ``ConformalClassifier`` with ``bins=`` the class), so at ``confidence`` the set
    contains the true class for that share of NORMAL films and, separately, of PNEUMONIA films,
    whatever the prevalence. With q0, q1 the classes' conformal quantiles, PNEUMONIA is in the set
    iff p >= 1 - q1 and NORMAL iff p <= q0; the set is a single class outside
    [min(1 - q1, q0+), max(1 - q1, q0+)) (q0+ the next float above q0) and is {both} or empty
    inside it: there the film is UNSURE.

    The band is then widened to contain ``threshold``: a film below it is NORMAL by the conformal
    set *and* by the threshold, one at or above it PNEUMONIA by both, so a decided film never
    contradicts the threshold rule every metric and the worklist use, and ``prediction`` keeps
    meaning "the threshold's class" for UNSURE films too. Without the widening a threshold
    outside the band would leave films that the set calls PNEUMONIA and the threshold NORMAL.
    """
    y, p = _arrays(y_true, prob)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    counts = [int((y == 0).sum()), int((y == 1).sum())]
    if min(counts) == 0:
        raise UserError(f"the UNSURE band needs calibration films of both classes, got {counts[0]} NORMAL and "
                        f"{counts[1]} PNEUMONIA")
    q0 = _conformal_quantile(p[y == 0], confidence)  # NORMAL films: alpha = p
    q1 = _conformal_quantile(1.0 - p[y == 1], confidence)  # PNEUMONIA films: alpha = 1 - p
    pneumonia_from = 1.0 - q1 if math.isfinite(q1) else 0.0
    normal_until = float(np.nextafter(q0, math.inf)) if math.isfinite(q0) else 1.0
    low, high = min(pneumonia_from, normal_until), max(pneumonia_from, normal_until)
    need = films_for_confidence(confidence)
    if min(counts) < need:
        log.warning("UNSURE band at %.3g confidence from %d NORMAL and %d PNEUMONIA films: each class needs at least "
                    "%d, so nearly every film will be UNSURE", confidence, *counts, need)
    band = {"method": "mondrian-conformal", "confidence": float(confidence), "q_normal": q0, "q_pneumonia": q1,
            "conformal_low": float(max(low, 0.0)), "conformal_high": float(min(high, 1.0)),
            "n_calibration": int(y.size), "class_counts": {"NORMAL": counts[0], "PNEUMONIA": counts[1]}}
    return band | dict(zip(("low", "high"), band_with_threshold(band["conformal_low"], band["conformal_high"],
                                                                 threshold)))


def films_for_confidence(confidence: float) -> int:
    """The fewest calibration films of a class that let conformal prediction at ``confidence``
    ever exclude that class: with n films the smallest p-value is 1 / (n + 1)."""
    n = 1
    while 1 / (n + 1) >= 1 - confidence:
        n += 1
    return n


def band_with_threshold(low: float, high: float, threshold: float) -> tuple[float, float]:
    """[low, high) widened to contain ``threshold`` (see ``conformal_band`` for why)."""
    return float(min(low, threshold)), float(max(high, np.nextafter(threshold, math.inf)))


def in_band(prob, low: float, high: float) -> np.ndarray:
    """UNSURE: low <= p < high."""
    p = np.asarray(prob, dtype=np.float64)
    return (p >= low) & (p < high)
