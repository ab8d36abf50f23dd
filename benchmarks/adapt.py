"""Does prevalence adaptation (``pneumoscan adapt``) help? Simulated site prevalences on held-out films.

Takes a training run's own held-out predictions (RUN/validation/predictions.csv: the films the
temperature was calibrated on, giving the calibration prior; RUN/test/predictions.csv: patients
the run never saw), resamples the test films to pneumonia prevalences 0.1 ... 0.9 (class-wise
with replacement, so only the mix changes: label shift), and compares, per prevalence:

* EM's estimate of the prevalence from the unlabelled resample (``calibration.em_prior``): its error,
  and how often its bootstrap 95% CI (``calibration.em_prior_ci``) covers the truth;
* the probabilities before adaptation, after (logit offset Δ from the EM estimate) and with the
  true prevalence (oracle Δ): accuracy at the 0.5 probability cut (the Bayes rule, which is what
  moves with the prevalence), log loss and ECE.

Also the UNSURE band (``conformal.conformal_band``) fitted on the validation predictions and
measured on the test films at their own prevalence: coverage and accuracy on decided films.

Run (the run used for benchmarks/adapt.md is described there):

    python benchmarks/adapt.py runs/frozen --out benchmarks/adapt.md

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from pneumoscan.core import calibration, conformal, metrics
from pneumoscan.core.files import write_text

PREVALENCES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows])


def resample(y, p, prevalence: float, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    n_pos = int(round(prevalence * n))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.r_[rng.choice(pos, n_pos), rng.choice(neg, n - n_pos)]
    return y[idx], p[idx]


def scores(y, p) -> dict[str, float]:
    return {"accuracy": float(((p >= 0.5) == y).mean()), "loss": float(metrics._bce(y, p).mean()),
            "ece": metrics.expected_calibration_error(y, p)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run folder with validation/ and test/ predictions.csv")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("adapt.md"))
    ap.add_argument("--n", type=int, default=500, help="films per simulated site")
    ap.add_argument("--reps", type=int, default=200, help="simulated sites per prevalence")
    ap.add_argument("--ci-reps", type=int, default=40, help="of which get a bootstrap CI (slow)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()
    y_val, p_val = read(args.run / "validation" / "predictions.csv")
    y_test, p_test = read(args.run / "test" / "predictions.csv")
    share = float(y_val.mean())
    # what train.finalize now stores as ModelMeta.prior["effective"] and adapt starts from
    prior = calibration.effective_prior(metrics.logit(np.clip(p_val, 1e-6, 1 - 1e-6)), y_val)
    rng = np.random.default_rng(args.seed)
    naive = []
    rows = []
    for pi in PREVALENCES:
        err, covered, acc = [], [], {"before": [], "adapted": [], "oracle": []}
        loss = {k: [] for k in acc}
        ece = {k: [] for k in acc}
        for rep in range(args.reps):
            y, p = resample(y_test, p_test, pi, args.n, rng)
            est, _ = calibration.em_prior(p, prior)
            err.append(est - pi)
            est_naive, _ = calibration.em_prior(p, share)
            if rep < args.ci_reps:
                lo, hi = calibration.em_prior_ci(p, prior, n_resamples=200, seed=rep)
                covered.append(lo <= pi <= hi)
            z = metrics.logit(np.clip(p, 1e-6, 1 - 1e-6))
            for name, q in (("before", p), ("adapted", metrics.sigmoid(z + calibration.prior_offset(est, prior))),
                            ("oracle", metrics.sigmoid(z + calibration.prior_offset(pi, prior))),
                            ("naive", metrics.sigmoid(z + calibration.prior_offset(est_naive, share)))):
                if name == "naive":
                    naive.append((pi, est_naive - pi, scores(y, q)))
                    continue
                s = scores(y, q)
                acc[name].append(s["accuracy"])
                loss[name].append(s["loss"])
                ece[name].append(s["ece"])
        e = np.array(err)
        rows.append((pi, float(np.mean(e)), float(np.mean(np.abs(e))), float(np.mean(covered)),
                     *(float(np.mean(acc[k])) for k in acc), *(float(np.mean(loss[k])) for k in loss),
                     *(float(np.mean(ece[k])) for k in ece)))
        print(f"prevalence {pi:.1f}: EM bias {rows[-1][1]:+.3f}, accuracy {rows[-1][4]:.3f} -> {rows[-1][5]:.3f}",
              file=sys.stderr)

    naive_rows = []
    for pi in PREVALENCES:
        got = [(e, s) for q, e, s in naive if q == pi]
        naive_rows.append(f"| {pi:.1f} | {np.mean([e for e, _ in got]):+.3f} | "
                          + " | ".join(f"{np.mean([s[k] for _, s in got]):.3f}" for k in ("accuracy", "loss", "ece"))
                          + " |")
    band = conformal.conformal_band(y_val, p_val, 0.95, 0.5)
    unsure = conformal.in_band(p_test, band["low"], band["high"])
    sel = metrics.selective_metrics(y_test, p_test, 0.5, ~unsure)
    all_acc = float(((p_test >= 0.5) == y_test).mean())
    all_ci = metrics.proportion_ci(int(((p_test >= 0.5) == y_test).sum()), y_test.size)

    table = "\n".join(
        f"| {pi:.1f} | {bias:+.3f} | {mae:.3f} | {cov:.2f} | {a0:.3f} | {a1:.3f} | {a2:.3f} | {l0:.3f} | {l1:.3f} | "
        f"{l2:.3f} | {e0:.3f} | {e1:.3f} | {e2:.3f} |"
        for pi, bias, mae, cov, a0, a1, a2, l0, l1, l2, e0, e1, e2 in rows)
    text = f"""# Prevalence adaptation on simulated sites (`benchmarks/adapt.py`)

**Data.** Held-out predictions of one training run (`{args.run.name}`): a frozen ImageNet MobileNetV2
(`pneumoscan train --recipe seed-study --set train.epochs=5 --views 2`) trained on 80% of the patients of
the Kaggle/Kermany *training* folder (`/work/shared/data/chest_xray/train`; patient-grouped split, seed 7).
Its temperature was fitted on its patient-grouped validation split ({y_val.size} films, PNEUMONIA share
{share:.3f}); the prior its calibrated probabilities are posteriors at (`calibration.effective_prior`, stored by
training as `ModelMeta.prior["effective"]`) is **{prior:.3f}**: temperature scaling has no intercept, and the
balanced class weights trained the model as if at 0.5. The simulated sites resample its test split — the other 20% of the
patients, {y_test.size} films ({int((y_test == 0).sum())} NORMAL, {int(y_test.sum())} PNEUMONIA), never used
for fitting — class by class with replacement to each prevalence: {args.n} films per site, {args.reps} sites
per prevalence (bootstrap CI, 200 resamples, on the first {args.ci_reps}). Only the class mix changes
(pure label shift), which is the assumption EM makes: a real site also changes how films look.

**Method.** EM (Saerens, Latinne & Decaestecker 2002, `calibration.em_prior`) estimates the prevalence from
the unlabelled probabilities; the adapted probability is sigmoid(logit(p) + Δ), Δ = logit(estimate) −
logit({prior:.3f}). "Oracle" uses the true prevalence. Accuracy is at the **0.5 probability cut** (the
Bayes rule, which follows the prevalence); a Youden or sensitivity threshold keeps its logit under
adaptation, so its decisions (and sensitivity/specificity) do not change by construction. Means over the
simulated sites.

| prevalence | EM bias | EM mean abs. error | 95% CI covers | accuracy before | adapted | oracle | log loss before | adapted | oracle | ECE before | adapted | oracle |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}

**Starting from the validation split's PNEUMONIA share ({share:.3f}) instead** (what adapt did before it
used the effective prior): EM is biased and the adaptation hurts at every middle prevalence.

| prevalence | EM bias | accuracy adapted | log loss adapted | ECE adapted |
| --- | --- | --- | --- | --- |
{chr(10).join(naive_rows)}

**UNSURE band on the same run** (Mondrian conformal, 95% confidence, fitted on the {y_val.size} validation
films; threshold 0.5 for this table): band [{band['low']:.4f}, {band['high']:.4f}); on the {y_test.size} test
films at their own prevalence ({y_test.mean():.3f}) it decided {sel['n_decided']} (coverage {sel['coverage']:.3f},
Wilson 95% CI {sel['coverage_ci95'][0]:.3f}–{sel['coverage_ci95'][1]:.3f}) with accuracy {sel['accuracy']:.3f}
({sel['accuracy_ci95'][0]:.3f}–{sel['accuracy_ci95'][1]:.3f}), sensitivity {sel['sensitivity']:.3f}
({sel['sensitivity_ci95'][0]:.3f}–{sel['sensitivity_ci95'][1]:.3f}) and specificity {sel['specificity']:.3f}
({sel['specificity_ci95'][0]:.3f}–{sel['specificity_ci95'][1]:.3f}) on the decided films, against accuracy
{all_acc:.3f} ({all_ci[0]:.3f}–{all_ci[1]:.3f}) on all of them; undecided: {sel['undecided_by_class']['NORMAL']} NORMAL,
{sel['undecided_by_class']['PNEUMONIA']} PNEUMONIA.

({time.perf_counter() - started:.0f} s on 2 shared CPU cores.)
"""
    write_text(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
