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

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "loss")

_EPS = 1e-7  # probability clip for the cross-entropy, so a confident mistake costs ~16, not inf


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



def logit(prob) -> np.ndarray:
    """log(p / (1 - p)) in float64; -inf at 0 and +inf at 1, without a warning."""
    p = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


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
