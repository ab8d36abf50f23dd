import json
import math
import time

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumoscan.core.errors import UserError
from pneumoscan.core.metrics import (
    METRIC_KEYS,
    _stratified_counts,
    _weighted_metrics,
    _weighted_ranking,
    binary_metrics,
    bootstrap_ci,
    brier,
    confusion,
    expected_calibration_error,
    reliability_curve,
    sigmoid,
)
from pneumoscan.core.calibration import choose_threshold, fit_temperature

Y = [0, 0, 1, 1, 1]
P = [0.1, 0.6, 0.4, 0.8, 0.9]


def noisy_scores(n: int, seed: int = 0, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels with informative but imperfect scores; rounding creates ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    p = sigmoid(1.5 * (2 * y - 1) + rng.normal(0, 1.5, n))
    return y, (p.round(decimals) if decimals is not None else p)


# ---------------------------------------------------------------- point metrics


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, P, 0.5)
    # pred = [0, 1, 0, 1, 1]: tn=1 fp=1 fn=1 tp=2
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["n"] == 5 and m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    # 5 of the 6 (positive, negative) pairs are ordered correctly; only (.4, .6) is not
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # ranked .9+ .8+ .6- .4+ .1-: precision at each positive is 1, 1, 3/4
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert m["loss"] == pytest.approx(-np.log([0.9, 0.4, 0.4, 0.8, 0.9]).mean())


def test_binary_metrics_match_sklearn():
    y, p = noisy_scores(400, decimals=2)
    m = binary_metrics(y, p, 0.4)
    pred = p >= 0.4
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["loss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))


def test_binary_metrics_keys_and_plain_types():
    m = binary_metrics(Y, P, 0.5)
    assert set(m) == {"n", "threshold", *METRIC_KEYS, "confusion_matrix"}
    for key, value in m.items():
        if key == "confusion_matrix":
            assert all(type(v) is int for row in value for v in row)
        else:
            assert type(value) in (int, float), key
    json.dumps(m)


def test_loss_is_clipped():
    assert math.isfinite(binary_metrics([1, 0], [0.0, 1.0], 0.5)["loss"])


def test_confusion_is_always_2x2():
    assert confusion([0, 0], [0, 0]) == [[2, 0], [0, 0]]
    assert confusion([1], [1]) == [[0, 0], [0, 1]]


def test_single_class_gives_nan_auc_without_raising():
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == 0.0  # no negatives: zero_division=0
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]


def test_sigmoid_is_stable():
    x = np.array([-1000.0, -5.0, 0.0, 5.0, 1000.0])
    with np.errstate(all="raise"):
        s = sigmoid(x)
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5
    np.testing.assert_allclose(s[1:4], 1 / (1 + np.exp(-x[1:4])))


# ---------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("decimals", [None, 1])
def test_vectorised_ranking_matches_sklearn_with_ties(decimals):
    y, p = noisy_scores(300, seed=1, decimals=decimals)
    if decimals is not None:
        assert np.unique(p).size < 15  # heavy ties
    w = np.random.default_rng(2).integers(0, 4, size=(3, y.size)).astype(float)
    w[0] = 1.0
    auc, ap = _weighted_ranking(y, p, w)
    for b in range(3):
        assert auc[b] == pytest.approx(roc_auc_score(y, p, sample_weight=w[b]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(y, p, sample_weight=w[b]), abs=1e-12)


def test_vectorised_metrics_equal_binary_metrics_on_each_resample():
    y, p = noisy_scores(120, seed=3, decimals=1)
    counts = _stratified_counts(y, 5, np.random.default_rng(0))
    fast = _weighted_metrics(y, p, 0.5, counts)
    for b in range(5):
        idx = np.repeat(np.arange(y.size), counts[b].astype(int))  # the resample, spelled out
        slow = binary_metrics(y[idx], p[idx], 0.5)
        for key in METRIC_KEYS:
            assert fast[key][b] == pytest.approx(slow[key], abs=1e-12), key


def test_resampling_is_stratified():
    y = np.array([0] * 7 + [1] * 13)
    counts = _stratified_counts(y, 50, np.random.default_rng(0))
    assert (counts[:, y == 1].sum(axis=1) == 13).all()
    assert (counts[:, y == 0].sum(axis=1) == 7).all()
    assert counts[:, y == 1].std(axis=0).max() > 0  # and it does resample


def test_separable_case_has_degenerate_auc_interval():
    # a plain bootstrap could draw a resample without positives; stratified never does
    y = np.array([0] * 30 + [1] * 3)
    p = np.r_[np.linspace(0.0, 0.4, 30), [0.8, 0.9, 0.95]]
    ci = bootstrap_ci(y, p, 0.5, n_resamples=500)
    assert ci["roc_auc"] == [1.0, 1.0] and ci["pr_auc"] == [1.0, 1.0]
    assert ci["accuracy"] == [1.0, 1.0]


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    y, p = noisy_scores(300)
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_resamples=500, seed=7)
    assert list(ci) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        low, high = ci[key]
        assert low < point[key] < high, key
        assert type(low) is float and type(high) is float
    assert bootstrap_ci(y, p, 0.5, n_resamples=500, seed=7) == ci
    assert bootstrap_ci(y, p, 0.5, n_resamples=500, seed=8) != ci


def test_bootstrap_ci_narrows_with_more_data():
    width = {}
    for n in (100, 2000):
        y, p = noisy_scores(n, seed=n)
        ci = bootstrap_ci(y, p, 0.5, n_resamples=400)
        width[n] = {k: ci[k][1] - ci[k][0] for k in METRIC_KEYS}
    for key in METRIC_KEYS:
        assert width[2000][key] < width[100][key], key


def test_bootstrap_single_class_gives_nan_auc():
    ci = bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.3], 0.5, n_resamples=50)
    assert all(math.isnan(v) for v in ci["roc_auc"] + ci["pr_auc"])
    assert ci["accuracy"][0] < 0.75 < ci["accuracy"][1]  # one false positive in four


def test_bootstrap_is_fast():
    y, p = noisy_scores(1000)
    start = time.perf_counter()
    bootstrap_ci(y, p, 0.5, n_resamples=2000)
    assert time.perf_counter() - start < 5.0  # typically well under a second; loose for shared CPUs


# ---------------------------------------------------------------- thresholds


def test_youden_by_hand():
    # thresholds .8 -> (tpr 2/3, fpr 0), J = 2/3; .4 -> (1, 1/2), J = 1/2; others lower
    assert choose_threshold(Y, P, "youden") == pytest.approx(0.8)


def test_youden_is_a_probability():
    # the best cut here is "everything positive" at the lowest score, never roc_curve's inf
    t = choose_threshold([0, 1, 1], [0.9, 0.95, 0.99], "youden")
    assert 0.0 <= t <= 1.0


def test_sensitivity_by_hand():
    assert choose_threshold(Y, P, "sensitivity:0.6") == pytest.approx(0.8)  # 2 of 3 positives
    assert choose_threshold(Y, P, "sensitivity:1") == pytest.approx(0.4)


def test_sensitivity_is_highest_threshold_reaching_target():
    y, p = noisy_scores(500, seed=4, decimals=2)
    t = choose_threshold(y, p, "sensitivity:0.95")
    assert recall_score(y, p >= t) >= 0.95
    higher = np.unique(p[p > t])
    assert higher.size and recall_score(y, p >= higher[0]) < 0.95


@pytest.mark.parametrize("rule, expected", [("0.5", 0.5), ("0.3", 0.3), (" 0.01 ", 0.01), ("0.99", 0.99)])
def test_numeric_threshold(rule, expected):
    assert choose_threshold(Y, P, rule) == expected
    assert choose_threshold([1, 1], [0.2, 0.3], rule) == expected  # no class requirement


BAD_RULES = ["bogus", "", "youden:0.9", "sensitivity:", "sensitivity:x", "sensitivity:1.5", "sensitivity:0",
             "1.5", "-0.1", "nan", "0", "1"]


@pytest.mark.parametrize("rule", BAD_RULES)
def test_invalid_rule_is_a_user_error(rule):
    with pytest.raises(UserError, match="youden"):
        choose_threshold(Y, P, rule)


@pytest.mark.parametrize("rule", ["youden", "sensitivity:0.95"])
def test_fitted_rule_needs_both_classes(rule):
    with pytest.raises(UserError, match="validation split"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], rule)


# ---------------------------------------------------------------- calibration


def test_brier_by_hand():
    # ((0.2 - 0)^2 + (0.7 - 1)^2 + (1.0 - 1)^2) / 3 = (0.04 + 0.09 + 0) / 3
    assert brier([0, 1, 1], [0.2, 0.7, 1.0]) == pytest.approx(0.13 / 3)
    y, p = noisy_scores(200)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p))


def test_ece_by_hand():
    # 2 bins. [0, .5): p = .1 .3 .4 (mean 0.8/3), y = 0 0 1 (rate 1/3) -> gap 1/15
    #         [.5, 1]: p = .6 .8 .9 (mean 2.3/3), y = 1 1 0 (rate 2/3) -> gap 0.1
    # ECE = 3/6 * 1/15 + 3/6 * 0.1 = 1/30 + 1/20 = 1/12
    y = [0, 0, 1, 1, 1, 0]
    p = [0.1, 0.3, 0.4, 0.6, 0.8, 0.9]
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(1 / 12)
    mean_pred, frac_pos, count = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(mean_pred, [0.8 / 3, 2.3 / 3])
    np.testing.assert_allclose(frac_pos, [1 / 3, 2 / 3])
    assert count.tolist() == [3, 3]


def test_ece_is_zero_when_calibrated_per_bin():
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_reliability_curve_matches_sklearn():
    y, p = noisy_scores(500, seed=5)
    mean_pred, frac_pos, count = reliability_curve(y, p, n_bins=10)
    sk_true, sk_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(frac_pos, sk_true)
    np.testing.assert_allclose(mean_pred, sk_pred)
    assert count.sum() == 500 and (count > 0).all()


def test_reliability_bins_are_closed_on_the_left():
    # a score on an edge belongs to the bin above, as in sklearn; 1.0 joins the last bin
    mean_pred, _, count = reliability_curve([0, 1, 1], [0.2, 0.5, 1.0], n_bins=2)
    assert mean_pred.tolist() == [0.2, 0.75] and count.tolist() == [1, 2]


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, 20_000)
    y = (rng.random(true_logits.size) < sigmoid(true_logits)).astype(int)
    logits = 4 * true_logits  # overconfident by a factor of 4
    t = fit_temperature(logits, y)
    assert t == pytest.approx(4.0, rel=0.1)
    assert log_loss(y, sigmoid(logits / t)) < log_loss(y, sigmoid(logits))
    assert expected_calibration_error(y, sigmoid(logits / t)) < expected_calibration_error(y, sigmoid(logits))


def test_temperature_single_class_is_identity():
    assert fit_temperature([3.0, -1.0, 2.0], [1, 1, 1]) == 1.0


def test_paired_bootstrap_point_estimates_match_sklearn_and_identical_models_differ_by_zero():
    from pneumoscan.core.metrics import paired_bootstrap_diff

    y, p = noisy_scores(400, seed=3)
    _, q = noisy_scores(400, seed=4)
    q = np.where(y == 1, q + 0.1, q)  # b is a better model on the same labels
    out = paired_bootstrap_diff(y, p, q, n_resamples=300, seed=1)
    assert out["roc_auc"]["a"] == pytest.approx(roc_auc_score(y, p))
    assert out["roc_auc"]["diff"] == pytest.approx(roc_auc_score(y, q) - roc_auc_score(y, p))
    assert out["accuracy"]["b"] == pytest.approx(accuracy_score(y, q >= 0.5))
    lo, hi = out["roc_auc"]["ci"]
    assert lo <= out["roc_auc"]["diff"] <= hi
    same = paired_bootstrap_diff(y, p, p, n_resamples=200)
    assert same["roc_auc"]["ci"] == [0.0, 0.0] and same["accuracy"]["diff"] == 0.0


def test_paired_bootstrap_resamples_patients_not_images():
    from pneumoscan.core.metrics import paired_bootstrap_diff

    y, p = noisy_scores(300, seed=5)
    _, q = noisy_scores(300, seed=6)
    # every image three times over (one patient, three films): an image-level bootstrap would
    # believe it had 900 independent cases; the patient-level one knows it has 300
    y3, p3, q3 = np.repeat(y, 3), np.repeat(p, 3), np.repeat(q, 3)
    groups = np.repeat(np.arange(300), 3)
    by_patient = paired_bootstrap_diff(y3, p3, q3, groups, n_resamples=400, seed=0)["roc_auc"]["ci"]
    by_image = paired_bootstrap_diff(y3, p3, q3, None, n_resamples=400, seed=0)["roc_auc"]["ci"]
    assert (by_patient[1] - by_patient[0]) > 1.4 * (by_image[1] - by_image[0])


def test_prevalence_weights_shift_the_positive_share_and_match_sklearn_weighted():
    from pneumoscan.core.metrics import prevalence_weights, weighted_metrics

    y, p = noisy_scores(500, seed=7)
    w = prevalence_weights(y, 0.625)
    assert (w * y).sum() / w.sum() == pytest.approx(0.625)
    m = weighted_metrics(y, p, 0.5, w)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5, sample_weight=w))
    assert m["precision"] == pytest.approx(precision_score(y, p >= 0.5, sample_weight=w))
    # sensitivity, specificity and AUC do not depend on prevalence
    assert m["recall"] == pytest.approx(recall_score(y, p >= 0.5))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    with pytest.raises(ValueError):
        prevalence_weights(y, 1.0)


def test_describe_rule_says_fixed_or_fitted():
    from pneumoscan.core.calibration import describe_rule

    assert describe_rule("0.5") == "fixed at 0.5 on the calibrated probability"
    assert describe_rule("youden") == "youden on the validation split"
    assert describe_rule("sensitivity:0.95") == "sensitivity:0.95 on the validation split"


# --- intervals that stay honest at the extremes (issue 14) ---------------------------------------

from pneumoscan.core.metrics import confidence_intervals, proportion_ci, rate_counts  # noqa: E402


@pytest.mark.parametrize("k, n, method, expected", [
    (10, 10, "clopper-pearson", (0.6915, 1.0)),  # (alpha/2)^(1/n) = 0.025^(1/10)
    (0, 10, "clopper-pearson", (0.0, 0.3085)),
    (5, 10, "clopper-pearson", (0.1871, 0.8129)),
    (10, 10, "wilson", (0.7225, 1.0)),  # n / (n + z^2)
    (0, 10, "wilson", (0.0, 0.2775)),
    (45, 50, "wilson", (0.7864, 0.9565)),
])
def test_proportion_ci_known_values(k, n, method, expected):
    assert proportion_ci(k, n, 0.95, method) == pytest.approx(expected, abs=1e-4)


def test_proportion_ci_closed_forms_at_the_extremes():
    z = 1.959963984540054
    for n in (1, 7, 20, 300):
        assert proportion_ci(n, n, method="clopper-pearson")[0] == pytest.approx(0.025 ** (1 / n))
        assert proportion_ci(n, n, method="wilson")[0] == pytest.approx(n / (n + z * z))
    assert all(math.isnan(v) for v in proportion_ci(0, 0))
    with pytest.raises(ValueError):
        proportion_ci(1, 1, method="bootstrap")


def test_rate_counts_match_binary_metrics():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 200), rng.random(200)
    m = binary_metrics(y, p, 0.4)
    for key, (k, n) in rate_counts(m["confusion_matrix"]).items():
        assert k / n == pytest.approx(m[key])


def test_confidence_intervals_without_errors_are_not_zero_width():
    y = np.array([0] * 10 + [1] * 10)
    p = np.where(y == 1, 0.6, 0.1) + np.linspace(0, 0.3, 20)  # perfect: a bootstrap would say 1.000 - 1.000 everywhere
    out = confidence_intervals(y, p, 0.5, n_resamples=200)
    assert out["method"]["recall"] == "wilson" and out["method"]["roc_auc"] == "bootstrap"
    for key in ("accuracy", "recall", "specificity", "precision"):
        lo, hi = out["ci"][key]
        assert hi == 1.0 and lo < 0.9, key  # 10/10 (20/20 for accuracy) is compatible with less
    assert out["ci"]["accuracy"][0] == pytest.approx(20 / (20 + 1.959963984540054 ** 2))
    for key in ("f1", "roc_auc", "pr_auc"):
        assert all(math.isnan(v) for v in out["ci"][key]) and "not estimable" in out["note"][key]
    assert "loss" not in out["note"] and out["ci"]["loss"][0] < out["ci"]["loss"][1]
    exact = confidence_intervals(y, p, 0.5, n_resamples=50, method="clopper-pearson")
    assert exact["ci"]["recall"][0] == pytest.approx(0.6915, abs=1e-4)


def test_confidence_intervals_keep_the_bootstrap_where_it_has_spread():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    out = confidence_intervals(y, p, 0.5, n_resamples=300, seed=1)
    boot = bootstrap_ci(y, p, 0.5, n_resamples=300, seed=1)
    assert out["ci"]["roc_auc"] == boot["roc_auc"] and out["ci"]["f1"] == boot["f1"] and not out["note"]
    nothing_flagged = confidence_intervals(y, np.zeros_like(p), 0.5, n_resamples=20)
    assert "undefined" in nothing_flagged["note"]["precision"]


# --- the UNSURE band and prior shift -------------------------------------------------------------

from pneumoscan.core import calibration, conformal  # noqa: E402
from pneumoscan.core import metrics as m  # noqa: E402


def test_conformal_band_on_known_vectors():
    # 5 NORMAL and 5 PNEUMONIA films; at 0.8 confidence each class keeps up to its largest score
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.05, 0.10, 0.15, 0.20, 0.60, 0.30, 0.70, 0.80, 0.90, 0.95])
    band = conformal.conformal_band(y, p, 0.8, threshold=0.5)
    # NORMAL stays in the set up to its largest calibration score 0.6; PNEUMONIA from 1 - 0.7 = 0.3 on
    assert band["q_normal"] == 0.6 and band["q_pneumonia"] == pytest.approx(0.7)
    assert band["low"] == pytest.approx(0.3) and band["high"] == pytest.approx(0.6) and band["high"] > 0.6
    assert band["class_counts"] == {"NORMAL": 5, "PNEUMONIA": 5} and band["n_calibration"] == 10
    assert conformal.in_band([0.29, 0.31, 0.6, 0.6000001], band["low"], band["high"]).tolist() == [False, True, True, False]
    # a threshold outside the conformal band widens it, so every decided film agrees with the threshold
    wide = conformal.conformal_band(y, p, 0.8, threshold=0.75)
    assert wide["conformal_high"] == band["conformal_high"] and wide["low"] == band["low"] and wide["high"] > 0.75
    # separated classes: the set is empty between them, and that gap is UNSURE too
    gap = conformal.conformal_band(y, np.array([0.05, 0.1, 0.15, 0.18, 0.2, 0.8, 0.85, 0.9, 0.93, 0.95]), 0.8, 0.5)
    assert gap["conformal_low"] == pytest.approx(0.2) and gap["conformal_low"] > 0.2
    assert gap["conformal_high"] == pytest.approx(0.2 + 0.6)  # 1 - q1 = 1 - (1 - 0.8)
    # too few films of a class for the confidence: that class is never excluded, the band spans everything
    assert conformal.films_for_confidence(0.8) == 5 and conformal.films_for_confidence(0.95) == 19
    few = conformal.conformal_band(y, p, 0.95, threshold=0.5)
    assert few["low"] == 0.0 and few["high"] == 1.0
    with pytest.raises(UserError, match="both classes"):
        conformal.conformal_band(np.zeros(5), np.linspace(0, 1, 5), 0.9, 0.5)


@pytest.mark.parametrize("seed, confidence", [(0, 0.9), (1, 0.95), (2, 0.8)])
def test_conformal_band_agrees_with_crepes_prediction_sets(seed, confidence):
    from crepes import ConformalClassifier

    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 400))
    y = rng.integers(0, 2, n)
    p = m.sigmoid(rng.normal(2.0 * y - 1.0, 1.5))
    band = conformal.conformal_band(y, p, confidence, threshold=float(rng.uniform(0.2, 0.8)))
    cc = ConformalClassifier().fit(np.where(y == 1, 1 - p, p), bins=y)  # Mondrian: one bin per class
    t = rng.random(3000)
    normal = cc.predict_set(t, bins=np.zeros(t.size, int), confidence=confidence, smoothing=False)
    pneumonia = cc.predict_set(1 - t, bins=np.ones(t.size, int), confidence=confidence, smoothing=False)
    not_single = normal + pneumonia != 1
    assert (conformal.in_band(t, band["conformal_low"], band["conformal_high"]) == not_single).all()
    # outside the widened band the set is the threshold's class
    outside = ~conformal.in_band(t, band["low"], band["high"])
    assert (pneumonia[outside] == (t[outside] >= band["low"])).all()
    assert band["low"] <= band["conformal_low"] and band["high"] >= band["conformal_high"]


def test_selective_metrics_counts_and_intervals():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.45, 0.7, 0.4, 0.55, 0.9])
    decided = np.array([True, False, True, False, False, True])
    out = m.selective_metrics(y, p, 0.5, decided)
    assert out["coverage"] == 0.5 and out["n_decided"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3) and out["sensitivity"] == 1.0 and out["specificity"] == 0.5
    assert out["accuracy_ci95"] == pytest.approx(list(proportion_ci(2, 3)))
    assert out["undecided_by_class"] == {"NORMAL": 1, "PNEUMONIA": 2}


def test_films_for_halfwidth_is_the_smallest_n():
    n = m.films_for_halfwidth(0.05, 0.9)
    lo, hi = proportion_ci(round(0.9 * n), n)
    assert (hi - lo) / 2 <= 0.05
    lo, hi = proportion_ci(round(0.9 * (n - 1)), n - 1)
    assert (hi - lo) / 2 > 0.05
    assert 100 < n < 200


def test_em_prior_recovers_known_priors_and_is_the_identity_without_shift():
    rng = np.random.default_rng(0)
    train_prior = 0.3

    def calibrated(n_pos, n_neg):
        # class-conditionals N(+1, 1) and N(-1, 1): the exact posterior at prior 0.3 is calibrated
        z = np.r_[rng.normal(1, 1, n_pos), rng.normal(-1, 1, n_neg)]
        return m.sigmoid(2 * z + np.log(train_prior / (1 - train_prior)))

    for site in (0.1, 0.5, 0.8):
        n = 20000
        est, _ = calibration.em_prior(calibrated(int(site * n), n - int(site * n)), train_prior)
        assert est == pytest.approx(site, abs=0.015)
    same, _ = calibration.em_prior(calibrated(6000, 14000), train_prior)
    assert same == pytest.approx(0.3, abs=0.015)
    # a fixed point: posteriors whose mean is the training prior stay where they are
    p = np.array([0.1, 0.2, 0.6])
    assert calibration.em_prior(p, float(p.mean()))[0] == pytest.approx(p.mean(), abs=1e-7)
    lo, hi = calibration.em_prior_ci(calibrated(300, 700), train_prior, n_resamples=200)
    assert lo < 0.3 < hi and hi - lo < 0.2
    # the offset turns posteriors at one prior into those at another (Bayes' rule)
    delta = calibration.prior_offset(0.8, 0.3)
    assert m.sigmoid(m.logit(0.3) + delta) == pytest.approx(0.8)


def test_effective_prior_undoes_a_missing_intercept():
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.75).astype(int)
    z_true = rng.normal(0, 1, y.size) + np.where(y == 1, 1.5, -1.5) + np.log(3.0)  # a logit at prevalence 0.75
    true_post = m.sigmoid(z_true)
    y = (rng.random(y.size) < true_post).astype(int)  # labels drawn from the true posteriors
    assert calibration.fit_intercept(z_true - 1.0, y) == pytest.approx(1.0, abs=0.15)
    prior = y.mean()
    # logits that are posteriors at prevalence 0.5 instead: the effective prior says so
    z_half = z_true - np.log(prior / (1 - prior))
    assert calibration.effective_prior(z_half, y) == pytest.approx(0.5, abs=0.04)
    assert calibration.effective_prior(z_true, y) == pytest.approx(prior, abs=0.04)


def test_fit_intercept_takes_probabilities_that_rounded_to_0_or_1(recwarn):
    """A tiny validation split can give probabilities of exactly 1.0: their logit is +inf."""
    y = np.array([0, 0, 1, 1, 1])
    z = m.logit([0.0, 0.2, 0.7, 1.0, 1.0])
    b = calibration.fit_intercept(z, y)
    assert np.isfinite(b) and np.isfinite(calibration.effective_prior(z, y))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_temperature_on_a_separated_validation_split_stays_finite(caplog):
    """Eight films the model separates: 0/1 targets would sharpen without end (T at its bound)."""
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    logits = np.array([-3.0, -2.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0])
    t = fit_temperature(logits, y)
    assert 0.1 < t < 5.0 and "separates all 8 validation films" in caplog.text
    prob = sigmoid(logits / t)
    assert prob.max() < 0.999 and prob.min() > 0.001
    assert 0.5 < choose_threshold(y, prob, "youden") < 0.99


def test_temperature_of_an_overlapping_split_is_the_plain_cross_entropy_minimum(caplog):
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    logits = np.array([-3.0, -2.0, 0.7, 0.5, 1.0, 2.0, 3.0, 4.0])  # one NORMAL above one PNEUMONIA
    t = fit_temperature(logits, y)
    loss = lambda temperature: log_loss(y, sigmoid(logits / temperature))  # noqa: E731
    assert loss(t) <= min(loss(t * 0.98), loss(t * 1.02)) and "separates" not in caplog.text
