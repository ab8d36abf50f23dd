"""Fitting on validation: the operating threshold, temperature scaling and the prior.

What a model learns from its validation split after training: the threshold rule turned into a
cut-off, the temperature that makes its probabilities honest, the intercept and effective prior
of balanced training, and EM estimates of a site's prevalence from unlabelled films (prior
shift). Classification metrics and their intervals live in ``core.metrics``; the UNSURE band in
``core.conformal``. SciPy and scikit-learn are imported inside the functions that use them.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pneumoscan.core import rules
from pneumoscan.core.errors import UserError
from pneumoscan.core.metrics import _arrays, _both_classes, logit, sigmoid

log = logging.getLogger(__name__)



def choose_threshold(y_true, prob, rule: str) -> float:
    """Turn an operating-point rule (``rules.parse_threshold``) into a probability cut-off,
    fitted on the validation split."""
    from sklearn.metrics import roc_curve
    y, p = _arrays(y_true, prob)
    parsed = rules.parse_threshold(rule)
    if parsed.kind == "fixed":
        return parsed.value
    if not _both_classes(y):
        raise UserError(
            f"threshold rule {parsed.text!r} needs both NORMAL and PNEUMONIA images in the validation split, "
            f"which has {int((y == 0).sum())} NORMAL and {int((y == 1).sum())} PNEUMONIA"
        )
    if parsed.kind == "youden":
        fpr, tpr, thresholds = roc_curve(y, p)
        # roc_curve's first threshold is inf (nothing predicted positive)
        return float(np.clip(thresholds[np.argmax(tpr - fpr)], 0.0, 1.0))
    # thresholds descend and recall only grows, so the first hit is the highest threshold
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    return float(np.clip(thresholds[np.argmax(tpr >= parsed.value)], 0.0, 1.0))


def describe_rule(rule: str) -> str:
    """How a threshold came about, for reports: fitted on validation, or fixed. A rule older
    models recorded that no longer parses is described as written, not refused."""
    try:
        return rules.parse_threshold(rule).describe()
    except rules.RuleError:
        return f"{rule} on the validation split"


def fit_temperature(logits, y_true) -> float:
    """Temperature T > 0 for ``sigmoid(logits / T)`` that minimises validation cross-entropy.

    One scalar cannot change the ranking, so AUC and a rank-based threshold are unaffected; only
    the probabilities become honest. Optimising log T keeps T positive and the search symmetric.
    When the logits separate the split completely (a small validation split, a well-fitted model),
    the 0/1 targets have no optimum: T runs to its bound, every probability becomes 0 or 1 and a
    Youden threshold 1.0. Only then the targets are Platt's (1999), as in scikit-learn's sigmoid
    calibration, (N+ + 1)/(N+ + 2) and 1/(N- + 2), which bound the confidence by what that many
    films can show. They are not used otherwise: on simulated splits of 522 films that overlap,
    they cost in-distribution ECE (0.017 -> 0.021 at a validation ROC-AUC of 0.998), and the shift
    protocol measured plain temperature scaling.
    """
    from scipy.optimize import minimize_scalar
    y, z = _arrays(y_true, logits)
    if not _both_classes(y):
        log.warning("temperature scaling skipped: the validation split has a single class")
        return 1.0
    target = y.astype(np.float64)
    if z[y == 0].max() < z[y == 1].min():
        n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
        target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        log.warning("the model separates all %d validation films: temperature fitted to Platt's smoothed targets "
                    "(a few more validation films would estimate it better)", y.size)

    def nll(log_t: float) -> float:
        x = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, x) - target * x))  # BCE on logits, no overflow

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    temperature = math.exp(result.x)
    log.info("fitted temperature %.3f (val NLL %.4f -> %.4f)", temperature, nll(0.0), result.fun)
    return temperature


def em_prior(prob, prior: float, *, tol: float = 1e-8, max_iter: int = 1000) -> tuple[float, int]:
    """The positive-class prior of unlabelled data by EM (Saerens, Latinne & Decaestecker 2002).

    ``prob`` are calibrated posteriors under the training prior ``prior``. Each step reweights
    them by the ratio of the current to the training prior, p' = r p / (r p + s (1 - p)) with
    r = pi / prior, s = (1 - pi) / (1 - prior), and takes their mean as the new pi: the maximum
    likelihood prior when the class-conditional distributions are those of the calibration
    data (label shift). Returns (pi, iterations)."""
    p = np.clip(np.asarray(prob, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)
    if not p.size:
        raise ValueError("em_prior needs at least one probability")
    if not 0 < prior < 1:
        raise ValueError(f"the training prior must be in (0, 1), got {prior}")
    pi = prior
    for i in range(1, max_iter + 1):
        r, s = pi / prior, (1 - pi) / (1 - prior)
        new = float(np.mean(r * p / (r * p + s * (1 - p))))
        new = min(max(new, 1e-6), 1 - 1e-6)
        if abs(new - pi) < tol:
            return new, i
        pi = new
    log.warning("EM prior estimate did not converge in %d iterations (last %.6f)", max_iter, pi)
    return pi, max_iter


def em_prior_ci(prob, prior: float, *, n_resamples: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``em_prior`` over the films."""
    p = np.asarray(prob, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    est = [em_prior(p[rng.integers(0, p.size, p.size)], prior, tol=1e-6)[0] for _ in range(n_resamples)]
    lo, hi = np.percentile(est, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def fit_intercept(logits, y_true) -> float:
    """The offset b for which sigmoid(logits + b) has the least cross-entropy on ``y_true``."""
    from scipy.optimize import minimize_scalar

    y, z = _arrays(y_true, logits)
    if not _both_classes(y):
        return 0.0
    # logit() of a probability that rounded to 0 or 1 is -inf or +inf (inf - inf would be nan);
    # beyond ±50 a float64 sigmoid says nothing more
    z = np.clip(z, -50.0, 50.0)
    if np.isnan(z).any():
        raise ValueError("fit_intercept: a logit is nan")
    result = minimize_scalar(lambda b: float(np.mean(np.logaddexp(0.0, z + b) - y * (z + b))), bounds=(-20, 20),
                             method="bounded")
    return float(result.x)


def effective_prior(logits, y_true) -> float:
    """The prevalence at which sigmoid(``logits``) are the posteriors, on labelled calibration films.

    Temperature scaling has no intercept, so after training with balanced class weights (which
    trains as if at prevalence 0.5) the calibrated probabilities are posteriors at neither the
    films' prevalence nor 0.5: EM from the films' prevalence was biased by -0.06 on held-out films
    (benchmarks/adapt.md). With b the intercept that would calibrate them at the films' prevalence
    π (``fit_intercept``), they are the posteriors at logit⁻¹(logit(π) - b): the prior that EM and
    the adaptation offset must start from."""
    y, z = _arrays(y_true, logits)
    if not _both_classes(y):
        return float(y.mean()) if y.size else math.nan
    return float(sigmoid(logit(y.mean()) - fit_intercept(z, y)))


def prior_offset(site: float, train: float) -> float:
    """The logit shift Δ = logit(site) - logit(train) that turns posteriors calibrated at prior
    ``train`` into posteriors at prior ``site`` (Bayes' rule with fixed class-conditionals)."""
    return float(logit(site) - logit(train))


REFERENCE_QUANTILES = 41  # per class: the validation logits kept in ModelMeta.prior["validation"]


def validation_reference(logits, y_true, n_quantiles: int = REFERENCE_QUANTILES) -> dict:
    """A compact picture of the calibrated validation logits, per class (``n_quantiles`` evenly
    spaced quantiles and the class counts): enough to redo EM on "validation-like" films
    (``reference_sample``), to check that the recorded effective prior is consistent, and to give
    the drift monitor its expected mean probability, without keeping any film."""
    y, z = _arrays(y_true, logits)
    z = np.clip(z, -50.0, 50.0)
    levels = np.linspace(0.0, 1.0, n_quantiles)
    out: dict = {"n": int(y.size), "mean_probability": float(sigmoid(z).mean()) if y.size else math.nan}
    for name, label in (("normal", 0), ("pneumonia", 1)):
        part = z[y == label]
        out[f"n_{name}"] = int(part.size)
        out[f"logit_quantiles_{name}"] = [float(v) for v in np.quantile(part, levels)] if part.size else []
    return out


def reference_sample(reference: dict) -> tuple[np.ndarray, np.ndarray]:
    """(logits, weights) standing in for the validation films, from ``validation_reference``:
    each class's quantiles, weighted so the weights sum to 1 and the PNEUMONIA share is the
    validation's."""
    zn = np.asarray(reference["logit_quantiles_normal"], dtype=np.float64)
    zp = np.asarray(reference["logit_quantiles_pneumonia"], dtype=np.float64)
    share = reference["n_pneumonia"] / max(reference["n_normal"] + reference["n_pneumonia"], 1)
    w = np.concatenate([np.full(zn.size, (1 - share) / max(zn.size, 1)), np.full(zp.size, share / max(zp.size, 1))])
    return np.concatenate([zn, zp]), w


def em_consistency(reference: dict, prior: float) -> float:
    """The prevalence EM finds on the validation films' reference from ``prior``: equal to the
    validation share when ``prior`` is what the probabilities are calibrated at (the intercept's
    score equation is EM's fixed point), far from it when the recorded prior is wrong."""
    z, w = reference_sample(reference)
    pi = prior
    for _ in range(1000):
        r, s = pi / prior, (1 - pi) / (1 - prior)
        p = sigmoid(z)
        new = float(np.sum(w * r * p / (r * p + s * (1 - p))))
        if abs(new - pi) < 1e-10:
            break
        pi = new
    return pi
