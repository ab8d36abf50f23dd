"""Metrics for a binary NORMAL (0) vs PNEUMONIA (1) classifier.

Pure functions on numpy arrays so that evaluation, reports and the service share one definition
of every number. Point estimates come from scikit-learn; only the bootstrap has its own
vectorised implementation (thousands of sklearn calls would take minutes), and the tests pin it
to sklearn. Every value returned is a plain Python float/int so results go straight to JSON.

Confidence intervals (``confidence_intervals``): accuracy, sensitivity, specificity and precision
are proportions of a count, so they get a binomial interval (Wilson by default, Clopper-Pearson
on request). A percentile bootstrap of a proportion collapses to zero width when there are no
errors ("1.000 - 1.000" on 20 images), while Wilson still says 20/20 is compatible with 0.84.
F1, ROC-AUC, PR-AUC and the log loss have no such closed form and keep the stratified bootstrap;
when every resample gives the same value (no error, no misranked pair to resample) the bootstrap
cannot say how uncertain the number is, and the interval is reported as not estimable (nan) with
a note, rather than as a zero-width interval that reads as certainty.

scikit-learn and SciPy are imported inside the functions that use them: importing both costs
about 1.5 s, and the scoring path (``sigmoid`` only) must start without them.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pneumoscan.core.errors import UserError

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "loss")

_EPS = 1e-7  # probability clip for the cross-entropy, so a confident mistake costs ~16, not inf
_THRESHOLD_RULES = (
    '"youden", "sensitivity:<recall in (0, 1]>" (e.g. "sensitivity:0.95") or a number in [0, 1] (e.g. "0.5")'
)


def _arrays(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}")
    return y, p


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy; the bootstrap reweights these, so they are kept unreduced."""
    p = np.clip(p, _EPS, 1 - _EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def sigmoid(x) -> np.ndarray:
    """float64 logistic function in numpy (no SciPy import on the scoring path). Each branch
    exponentiates only non-positive numbers, so it never overflows, unlike 1 / (1 + exp(-x))."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(under="ignore"):  # exp(-1000) is 0.0, the right answer, not an error
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def confusion(y_true, y_pred) -> list[list[int]]:
    """[[tn, fp], [fn, tp]]; ``labels`` keeps it 2x2 when a batch or split lacks a class."""
    from sklearn.metrics import confusion_matrix
    return confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=[0, 1]).tolist()


def binary_metrics(y_true, prob, threshold: float) -> dict:
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, precision_score, recall_score,
                                 roc_auc_score)
    y, p = _arrays(y_true, prob)
    pred = (p >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = cm = confusion(y, pred)
    both = _both_classes(y)
    return {
        "n": int(y.size),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)) if y.size else math.nan,
        "precision": float(precision_score(y, pred, labels=[0, 1], zero_division=0)),
        "recall": float(recall_score(y, pred, labels=[0, 1], zero_division=0)),
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0)),
        # ranking metrics are undefined with one class; nan keeps the report going
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
        "loss": float(_bce(y, p).mean()) if y.size else math.nan,
        "confusion_matrix": cm,
    }


def _stratified_counts(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each sample is drawn, per resample: shape (n_resamples, n).

    Positives and negatives are resampled separately, so every resample has the original class
    counts and AUC stays defined even for small, imbalanced splits.
    """
    counts = np.zeros((n_resamples, y.size), dtype=np.float64)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        if idx.size:
            counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1 / idx.size), size=n_resamples)
    return counts


def _weighted_ranking(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision for each row of sample weights ``w`` (shape (b, n)).

    Integer weights are the same as repeating samples, so row b equals sklearn on the resample.
    Ties are grouped into one threshold: the trapezoidal ROC then gives a tie half credit
    (the Mann-Whitney U statistic), and AP follows sklearn's step sum over distinct thresholds.
    """
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(ps)), ps.size - 1]  # last index of each distinct score
    ws = w[:, order]
    tps = np.cumsum(ws * ys, axis=1)[:, ends]
    fps = np.cumsum(ws * (1 - ys), axis=1)[:, ends]
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    tps_prev = np.pad(tps, ((0, 0), (1, 0)))[:, :-1]
    fps_prev = np.pad(fps, ((0, 0), (1, 0)))[:, :-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((fps - fps_prev) * (tps + tps_prev) / 2).sum(axis=1) / (n_pos * n_neg)[:, 0]
        # a threshold absent from the resample adds no recall, so its precision never counts
        precision = np.divide(tps, tps + fps, out=np.zeros_like(tps), where=tps + fps > 0)
        ap = ((tps - tps_prev) * precision).sum(axis=1) / n_pos[:, 0]
    return auc, ap


def _weighted_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every METRIC_KEYS value for each row of sample weights, in a handful of matrix products."""
    pred = p >= threshold
    n_pos, n_neg = w @ (y == 1), w @ (y == 0)
    tp, fp = w @ (pred & (y == 1)), w @ (pred & (y == 0))
    fn, tn = n_pos - tp, n_neg - fp

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # zero_division=0, as in sklearn
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    auc, ap = _weighted_ranking(y, p, w)
    return {
        "accuracy": (tp + tn) / (n_pos + n_neg),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, n_pos),
        "specificity": ratio(tn, n_neg),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": auc,
        "pr_auc": ap,
        "loss": (w @ _bce(y, p)) / (n_pos + n_neg),
    }


def bootstrap_ci(
    y_true, prob, threshold: float, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile intervals from a stratified bootstrap: how much each metric moves with the sample."""
    y, p = _arrays(y_true, prob)
    if not y.size or n_resamples < 1:
        raise ValueError(f"bootstrap_ci needs samples and resamples, got {y.size} and {n_resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // y.size)  # bound the (resamples, n) matrices to ~16 MB each
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_resamples, chunk):
        counts = _stratified_counts(y, min(chunk, n_resamples - start), rng)
        parts.append(_weighted_metrics(y, p, threshold, counts))
    q = [50 * (1 - level), 50 * (1 + level)]
    ci = {}
    for key in METRIC_KEYS:
        values = np.concatenate([part[key] for part in parts])
        # only AUCs can be nan, and then in every resample (a class is missing)
        low, high = (math.nan, math.nan) if np.isnan(values).all() else np.percentile(values, q)
        ci[key] = [float(low), float(high)]
    return ci


RATE_METRICS = ("accuracy", "precision", "recall", "specificity")  # proportions of a count
BOOTSTRAP_METRICS = ("f1", "roc_auc", "pr_auc", "loss")
PROPORTION_METHODS = {"wilson": "wilson", "clopper-pearson": "exact"}  # ours -> scipy's name
_NO_SPREAD = 1e-12


def proportion_ci(successes: int, trials: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Binomial interval of ``successes / trials``; (nan, nan) when ``trials`` is 0.

    Wilson (score) intervals keep close to the nominal coverage at small n and stay inside [0, 1];
    Clopper-Pearson ("exact") never covers less than the nominal level and is wider. Both stay
    honest at 0 and n successes, where a bootstrap has no spread.
    """
    if method not in PROPORTION_METHODS:
        raise ValueError(f"unknown interval method {method!r}; valid: {', '.join(PROPORTION_METHODS)}")
    successes, trials = int(successes), int(trials)
    if trials <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=level, method=PROPORTION_METHODS[method])
    return float(ci.low), float(ci.high)


def rate_counts(confusion_matrix) -> dict[str, tuple[int, int]]:
    """(successes, trials) behind each rate metric of a [[tn, fp], [fn, tp]] matrix."""
    (tn, fp), (fn, tp) = confusion_matrix
    return {"accuracy": (tp + tn, tn + fp + fn + tp), "precision": (tp, tp + fp),
            "recall": (tp, tp + fn), "specificity": (tn, tn + fp)}


_EMPTY_RATE = {"accuracy": "no images", "precision": "no image predicted PNEUMONIA",
               "recall": "no PNEUMONIA image", "specificity": "no NORMAL image"}


def confidence_intervals(y_true, prob, threshold: float, *, n_resamples: int = 2000, seed: int = 0,
                         level: float = 0.95, method: str = "wilson") -> dict[str, dict]:
    """Intervals for every METRIC_KEYS value: {"ci": key -> [lo, hi], "method": key -> name,
    "note": key -> sentence (only where an interval is undefined or not estimable)}.

    Rates get ``proportion_ci(method)``; the others the stratified percentile bootstrap, reported
    as [nan, nan] with a note when the resamples have no spread (see the module docstring).
    """
    y, p = _arrays(y_true, prob)
    boot = bootstrap_ci(y, p, threshold, n_resamples=n_resamples, seed=seed, level=level)
    counts = rate_counts(confusion(y, (p >= threshold).astype(np.int64)))
    ci: dict[str, list[float]] = {}
    how: dict[str, str] = {}
    note: dict[str, str] = {}
    for key in METRIC_KEYS:
        if key in RATE_METRICS:
            k, n = counts[key]
            ci[key], how[key] = list(proportion_ci(k, n, level, method)), method
            if not n:
                note[key] = f"undefined: {_EMPTY_RATE[key]}"
            continue
        lo, hi = boot[key]
        how[key] = "bootstrap"
        if math.isnan(lo):
            note[key] = "undefined: needs both classes"
        elif hi - lo <= _NO_SPREAD:
            note[key] = (f"not estimable: every bootstrap resample gives {lo:.3f} (no errors or misranked "
                         "pairs to resample), which says nothing about its uncertainty")
            lo = hi = math.nan
        ci[key] = [float(lo), float(hi)]
    return {"ci": ci, "method": how, "note": note}


def paired_bootstrap_diff(
    y_true, score_a, score_b, groups=None, *, threshold: float = 0.5, n_resamples: int = 2000,
    seed: int = 0, level: float = 0.95,
) -> dict[str, dict[str, float | list[float]]]:
    """Metrics of two models on the same images, and a percentile CI of their difference (b - a).

    Resampling *patients* (``groups``), not images, keeps a patient's correlated images together;
    both models see the same resample, so the interval is of the paired difference, far tighter
    than comparing two separate CIs. Scores are probabilities, or 0/1 predictions with threshold 0.5.
    """
    y, a = _arrays(y_true, score_a)
    _, b = _arrays(y_true, score_b)
    if a.shape != b.shape or not y.size:
        raise ValueError(f"paired scores need the same non-empty shape, got {a.shape} and {b.shape}")
    _, group_index = np.unique(np.asarray(groups if groups is not None else np.arange(y.size)), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    full = np.ones((1, y.size))
    point_a, point_b = _weighted_metrics(y, a, threshold, full), _weighted_metrics(y, b, threshold, full)
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_KEYS}
    chunk = max(1, 2_000_000 // y.size)
    for start in range(0, n_resamples, chunk):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=min(chunk, n_resamples - start))
        w = counts[:, group_index].astype(np.float64)
        ma, mb = _weighted_metrics(y, a, threshold, w), _weighted_metrics(y, b, threshold, w)
        for k in METRIC_KEYS:
            diffs[k].append(mb[k] - ma[k])
    q = [50 * (1 - level), 50 * (1 + level)]
    out = {}
    for k in METRIC_KEYS:
        d = np.concatenate(diffs[k])
        d = d[~np.isnan(d)]
        lo, hi = np.percentile(d, q) if d.size else (math.nan, math.nan)
        out[k] = {"a": float(point_a[k][0]), "b": float(point_b[k][0]),
                  "diff": float(point_b[k][0] - point_a[k][0]), "ci": [float(lo), float(hi)]}
    return out


def prevalence_weights(y_true, target: float) -> np.ndarray:
    """Sample weights that make the positive share ``target`` without changing either class's
    distribution: what metrics would be on data with another prevalence (label shift)."""
    y = np.asarray(y_true).astype(int)
    if not 0 < target < 1 or not _both_classes(y):
        raise ValueError(f"prevalence_weights needs both classes and 0 < target < 1, got {target}")
    pi = y.mean()
    return np.where(y == 1, target / pi, (1 - target) / (1 - pi))


def weighted_metrics(y_true, prob, threshold: float, weights) -> dict[str, float]:
    """``binary_metrics``' values (and the loss) under per-sample weights."""
    y, p = _arrays(y_true, prob)
    w = np.asarray(weights, dtype=np.float64)[None, :]
    return {k: float(v[0]) for k, v in _weighted_metrics(y, p, threshold, w).items()}


def choose_threshold(y_true, prob, rule: str) -> float:
    """Turn an operating-point rule into a probability cut-off, fitted on the validation split."""
    from sklearn.metrics import roc_curve
    y, p = _arrays(y_true, prob)
    rule = str(rule).strip()
    if rule == "youden":
        _need_both_classes(y, rule)
        fpr, tpr, thresholds = roc_curve(y, p)
        # roc_curve's first threshold is inf (nothing predicted positive)
        return float(np.clip(thresholds[np.argmax(tpr - fpr)], 0.0, 1.0))
    if rule.startswith("sensitivity:"):
        target = _parse_float(rule.removeprefix("sensitivity:"), rule)
        if not 0 < target <= 1:
            raise UserError(f"threshold rule {rule!r}: the recall must be in (0, 1]; use {_THRESHOLD_RULES}")
        _need_both_classes(y, rule)
        # thresholds descend and recall only grows, so the first hit is the highest threshold
        _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        return float(np.clip(thresholds[np.argmax(tpr >= target)], 0.0, 1.0))
    value = _parse_float(rule, rule)
    if not 0 <= value <= 1:
        raise UserError(f"threshold rule {rule!r} is outside [0, 1]; use {_THRESHOLD_RULES}")
    return value


def describe_rule(rule: str) -> str:
    """How a threshold came about, for reports: fitted on validation, or fixed."""
    try:
        return f"fixed at {float(rule):g} on the calibrated probability"
    except ValueError:
        return f"{rule} on the validation split"


def _parse_float(text: str, rule: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"unknown threshold rule {rule!r}; use {_THRESHOLD_RULES}") from None


def _need_both_classes(y: np.ndarray, rule: str) -> None:
    if not _both_classes(y):
        raise UserError(
            f"threshold rule {rule!r} needs both NORMAL and PNEUMONIA images in the validation split, "
            f"which has {int((y == 0).sum())} NORMAL and {int((y == 1).sum())} PNEUMONIA"
        )


def brier(y_true, prob) -> float:
    from sklearn.metrics import brier_score_loss
    y, p = _arrays(y_true, prob)
    return float(brier_score_loss(y, p, pos_label=1))


def reliability_curve(y_true, prob, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: mean predicted P(pneumonia), observed pneumonia rate, and bin size.

    Equal-width bins [lo, hi) with the last one closed, binned exactly like sklearn's
    ``calibration_curve(strategy="uniform")``, which does not return the counts needed for ECE.
    """
    y, p = _arrays(y_true, prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p, side="right")
    count = np.bincount(bins, minlength=n_bins)
    nonempty = count > 0
    mean_pred = np.bincount(bins, weights=p, minlength=n_bins)[nonempty] / count[nonempty]
    frac_pos = np.bincount(bins, weights=y, minlength=n_bins)[nonempty] / count[nonempty]
    return mean_pred, frac_pos, count[nonempty]


def expected_calibration_error(y_true, prob, n_bins: int = 15) -> float:
    """Bin-size-weighted gap between predicted P(pneumonia) and the observed rate (Guo et al. 2017)."""
    mean_pred, frac_pos, count = reliability_curve(y_true, prob, n_bins)
    if not count.sum():
        return math.nan
    return float((count * np.abs(frac_pos - mean_pred)).sum() / count.sum())


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


# --- selective classification: the UNSURE band --------------------------------------------------

UNSURE_RULES = '"none" or "conformal:<confidence in (0, 1)>" (e.g. "conformal:0.95")'


def parse_unsure(rule: str) -> float | None:
    """The confidence of an UNSURE rule (``"conformal:0.95"`` -> 0.95), None for ``"none"``."""
    rule = str(rule).strip()
    if rule == "none":
        return None
    if rule.startswith("conformal:"):
        value = _parse_float_or_none(rule.removeprefix("conformal:"))
        if value is not None and 0 < value < 1:
            return value
    raise UserError(f"unknown UNSURE rule {rule!r}; use {UNSURE_RULES}")


def _parse_float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def logit(prob) -> np.ndarray:
    """log(p / (1 - p)) in float64; -inf at 0 and +inf at 1, without a warning."""
    p = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


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


def selective_metrics(y_true, prob, threshold: float, decided, level: float = 0.95) -> dict:
    """What the decided films alone are worth: coverage (the share decided, i.e. neither UNSURE nor
    NOT_ASSESSED), and accuracy, sensitivity and specificity of the threshold's class on them,
    each with a Wilson interval; and how many films of each true class were left undecided."""
    y, p = _arrays(y_true, prob)
    d = np.asarray(decided, dtype=bool).ravel()
    pred, yd = p[d] >= threshold, y[d]
    tn, fp = int(((yd == 0) & ~pred).sum()), int(((yd == 0) & pred).sum())
    fn, tp = int(((yd == 1) & ~pred).sum()), int(((yd == 1) & pred).sum())
    counts = rate_counts([[tn, fp], [fn, tp]])  # counted here: sklearn refuses an empty selection
    out: dict = {"n": int(y.size), "n_decided": int(d.sum()), "threshold": float(threshold),
                 "coverage": float(d.mean()) if y.size else math.nan,
                 "coverage_ci95": list(proportion_ci(int(d.sum()), int(y.size), level))}
    for key, name in (("accuracy", "accuracy"), ("recall", "sensitivity"), ("specificity", "specificity")):
        k, n = counts[key]
        out[name] = k / n if n else math.nan
        out[f"{name}_ci95"] = list(proportion_ci(k, n, level))
    out["undecided_by_class"] = {"NORMAL": int(((y == 0) & ~d).sum()), "PNEUMONIA": int(((y == 1) & ~d).sum())}
    out["ci_method"] = "wilson"
    return out


def films_for_halfwidth(halfwidth: float, expected: float, level: float = 0.95, limit: int = 100_000) -> int:
    """The fewest films that give a Wilson interval no wider than ±``halfwidth`` around a rate of
    ``expected`` (e.g. specificity 0.9 ± 0.05 needs ~140 NORMAL films)."""
    if not 0 < halfwidth < 0.5 or not 0 <= expected <= 1:
        raise ValueError(f"need 0 < halfwidth < 0.5 and expected in [0, 1], got {halfwidth}, {expected}")

    def wide(n: int) -> bool:
        lo, hi = proportion_ci(round(expected * n), n, level)
        return (hi - lo) / 2 > halfwidth

    lo, hi = 1, 2
    while wide(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return limit
    while lo < hi:  # the half-width shrinks with n, up to rounding of the successes
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if wide(mid) else (lo, mid)
    return hi


# --- prior shift: a site's prevalence from unlabelled films -------------------------------------

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
