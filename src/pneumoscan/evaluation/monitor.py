"""Drift monitor: do the recent films still look like the ones the model was validated on?

No labels are needed. Over the last N films (``WindowFilm``) it checks, each against an expected
band from the model's own validation data (``ModelMeta.prior["validation"]`` and the OOD
detector's validation-score quantiles, recorded by training and by tools/repair_prior.py):

* prevalence: EM's estimate (Saerens et al. 2002, from the recorded effective prior) with its
  bootstrap 95% CI; alert when the CI excludes the reference prevalence (the site's, when the model
  was adapted or recalibrated to it, else the validation share);
* mean probability: alert when it leaves reference ± 1.96 sd/sqrt(n) (sd from the reference);
* NOT_ASSESSED and UNSURE rates: alert when the Wilson 95% CI of the window's rate lies above the
  validation rate (only more is a problem);
* OOD score: two-sample Kolmogorov-Smirnov distance of the window's scores to the validation
  scores (their quantiles; n = the validation films), alert at p < 0.01. Contrast, exposure or a new
  machine move this one first.

Every alert says what it means and what to do: collect reads and re-fit (``pneumoscan adapt --db``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pneumoscan.core import calibration, conformal, metrics
from pneumoscan.modeling.artifact import ModelMeta

P_OOD = 0.01
ACTION = ("collect radiologists' reads of recent films (pneumoscan reads import, or the page's read form), check "
          "with pneumoscan site-report, and recalibrate with pneumoscan adapt --db")


@dataclass(frozen=True)
class WindowFilm:
    logit: float  # the calibrated logit the model output (before any site offset)
    label: str  # NORMAL | PNEUMONIA | UNSURE | NOT_ASSESSED
    ood_score: float | None = None


def _check(name: str, value, band, alert: bool, meaning: str, **extra) -> dict:
    return {"name": name, "value": value, "expected": band, "alert": bool(alert),
            "meaning": meaning if alert else "", "action": ACTION if alert else ""} | extra


def _reference(meta: ModelMeta) -> tuple[dict, float, float]:
    prior = meta.prior or {}
    ref = prior.get("validation")
    if not ref:
        from pneumoscan.core.errors import UserError
        raise UserError("this model records no validation reference (ModelMeta.prior['validation']): retrain it or "
                        "run tools/repair_prior.py on it")
    expected = float(prior.get("site", prior["calibration"]))
    return ref, float(prior["effective"]), expected


def _ood_check(meta: ModelMeta, scores: np.ndarray) -> dict | None:
    from scipy.stats import kstwobign

    q = ((meta.ood or {}).get("extra") or {}).get("val_score_quantiles")
    if not q or not scores.size:
        return None
    q = np.asarray(q, float)
    levels = np.linspace(0, 1, q.size)
    xs = np.sort(scores)
    ref_cdf = np.interp(xs, q, levels, left=0.0, right=1.0)
    n, m = xs.size, int(meta.ood.get("n_val", q.size))
    d = float(max(np.max(np.arange(1, n + 1) / n - ref_cdf), np.max(ref_cdf - np.arange(n) / n)))
    pval = float(kstwobign.sf(d * math.sqrt(n * m / (n + m))))
    return _check("ood_score", {"ks": d, "p": pval, "median": float(np.median(xs))},
                  {"median": float(np.interp(0.5, levels, q)), "p_at_least": P_OOD}, pval < P_OOD,
                  "the films' features moved away from the validation films' (new machine, exposure, contrast, "
                  "processing or population): the model's probabilities may no longer be calibrated here")


def monitor(meta: ModelMeta, window: Sequence[WindowFilm], *, n_bootstrap: int = 500, seed: int = 0) -> dict:
    """The checks over ``window`` and whether any alerts."""
    ref, effective, expected_prev = _reference(meta)
    films = list(window)
    assessed = [f for f in films if f.label != "NOT_ASSESSED"]
    checks = []
    if assessed:
        z = np.array([f.logit for f in assessed], float)
        p = metrics.sigmoid(z)
        pi, _ = calibration.em_prior(p, effective)
        lo, hi = calibration.em_prior_ci(p, effective, n_resamples=n_bootstrap, seed=seed)
        checks.append(_check("prevalence", {"em": pi, "ci": [lo, hi]}, expected_prev, not lo <= expected_prev <= hi,
                             "the share of pneumonia among the films moved (a new population or referral pattern): "
                             "PPV, NPV and the calibrated probabilities change with it", n=len(assessed)))
        zs, w = calibration.reference_sample(ref)
        ps = metrics.sigmoid(zs)
        mean_ref = float(np.sum(w * ps))
        half = 1.96 * math.sqrt(float(np.sum(w * (ps - mean_ref) ** 2)) / len(assessed))
        mean = float(p.mean())
        checks.append(_check("mean_probability", mean, [mean_ref - half, mean_ref + half], abs(mean - mean_ref) > half,
                             "the model's average answer moved: a prevalence change or a change in the films"))
    for name, count, expected, meaning in (
            ("not_assessed_rate", len(films) - len(assessed),
             1 - float((meta.ood or {}).get("percentile", 99.5)) / 100,
             "more films than in validation fail the input checks: a new machine, protocol or wrong studies sent"),
            ("unsure_rate", sum(f.label == "UNSURE" for f in assessed), _unsure_reference(meta, ref),
             "more films fall in the UNSURE band than in validation: the model is less sure on this site's films")):
        total = len(films) if name == "not_assessed_rate" else len(assessed)
        if total:
            lo, hi = metrics.proportion_ci(count, total)
            checks.append(_check(name, {"rate": count / total, "ci": [lo, hi]}, expected, lo > expected, meaning))
    scores = np.array([f.ood_score for f in assessed if f.ood_score is not None], float)
    ood = _ood_check(meta, scores)
    if ood:
        checks.append(ood)
    return {"n": len(films), "alert": any(c["alert"] for c in checks), "checks": checks}


def _unsure_reference(meta: ModelMeta, ref: dict) -> float:
    """The validation films' UNSURE share, from the reference quantiles and the band."""
    if not meta.unsure:
        return 0.0
    z, w = calibration.reference_sample(ref)
    p = metrics.sigmoid(z + meta.logit_offset)
    return float(np.sum(w * conformal.in_band(p, float(meta.unsure["low"]), float(meta.unsure["high"]))))


def summary(result: dict) -> str:
    """What ``pneumoscan monitor`` prints: one line per check, ALERT lines with meaning and action."""
    lines = [f"drift monitor over the last {result['n']} films: " + ("ALERT" if result["alert"] else "ok")]
    for c in result["checks"]:
        lines.append(f"  {'ALERT' if c['alert'] else 'ok   '} {c['name']}: {c['value']} (expected {c['expected']})")
        if c["alert"]:
            lines.append(f"        means: {c['meaning']}\n        do: {c['action']}")
    return "\n".join(lines)
