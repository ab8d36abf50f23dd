"""What the model did on one site's films that radiologists have read (``pneumoscan site-report``).

The computation works on typed in-memory rows (``SiteFilm``), so it is tested without a database;
``commands`` turns the result store's films, results and reads into them. Films of one patient
are not independent (follow-ups, repeats), so every 95% CI comes from a *cluster* bootstrap:
patients (or studies, when the patient is unknown) are resampled with replacement, with all their
films. A metric that a resample cannot define (no PNEUMONIA film drawn, say) is left out of that
resample; the CI says over how many resamples it was taken.

The reader's label is the reference; films the reader marked NOT_ASSESSABLE and films without a
read are left out of the metrics (counted). NOT_ASSESSED films (the model's own input checks) are
counted by reason and left out of the metrics too: the model gave no answer for them. UNSURE films
keep their threshold class in the metrics (as ``evaluate`` does) and are counted separately, with
the accuracy on the decided films beside it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from pneumoscan.core import metrics

NORMAL, PNEUMONIA, NOT_ASSESSABLE = "NORMAL", "PNEUMONIA", "NOT_ASSESSABLE"
READ_LABELS = (NORMAL, PNEUMONIA, NOT_ASSESSABLE)
METRICS = ("prevalence", "accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "ece")
MIN_GROUP = 30  # films with a read below which a month or device gets no row of its own
SITE_TEMPLATE = "site_report.html.j2"  # rendered by evaluation.report (its escape policy, its atomic write)


@dataclass(frozen=True)
class SiteFilm:
    """One scored film and its reader's current read (None when unread)."""
    film: str  # an opaque id (the store's film id); never a patient identifier in logs
    cluster: str  # patient (or study) key: the bootstrap's unit
    probability: float
    threshold: float
    label: str  # the model's: NORMAL | PNEUMONIA | UNSURE | NOT_ASSESSED
    read: str | None = None  # the reader's: NORMAL | PNEUMONIA | NOT_ASSESSABLE
    reason: str | None = None  # why NOT_ASSESSED (flag code)
    when: datetime | None = None
    device: str = ""  # Manufacturer / model name from the DICOM header
    model_version: str = ""

    @property
    def predicted(self) -> int:
        return int(self.probability >= self.threshold)


def point_metrics(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The site metrics of one (re)sample; nan where undefined."""
    from sklearn.metrics import roc_auc_score

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b else math.nan

    tp, tn = float(np.sum(pred & (y == 1))), float(np.sum(~pred & (y == 0)))
    fp, fn = float(np.sum(pred & (y == 0))), float(np.sum(~pred & (y == 1)))
    both = 0 < y.sum() < y.size
    return {"prevalence": ratio(y.sum(), y.size), "accuracy": ratio(tp + tn, y.size),
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
            "ece": metrics.expected_calibration_error(y, p, 10) if y.size else math.nan}


def cluster_bootstrap(y, p, pred, clusters, *, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict]:
    """Point estimate and percentile CI of each metric, resampling clusters with their films."""
    y, p, pred = np.asarray(y, int), np.asarray(p, float), np.asarray(pred, bool)
    keys, inverse = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(keys.size)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(n_resamples):
        idx = np.concatenate([members[k] for k in rng.integers(0, keys.size, keys.size)])
        for name, value in point_metrics(y[idx], p[idx], pred[idx]).items():
            if not math.isnan(value):
                draws[name].append(value)
    point = point_metrics(y, p, pred)
    out = {}
    for name in METRICS:
        values = draws.get(name, [])
        lo, hi = (np.percentile(values, [50 * (1 - level), 50 * (1 + level)]) if len(values) >= 20
                  else (math.nan, math.nan))
        out[name] = {"value": point[name], "ci": [float(lo), float(hi)], "n_resamples": len(values)}
    return out


def _summary(films: Sequence[SiteFilm], n_resamples: int, seed: int) -> dict:
    """The metrics block of a set of films (all of them, one month, one device)."""
    assessed = [f for f in films if f.label != "NOT_ASSESSED"]
    read = [f for f in assessed if f.read in (NORMAL, PNEUMONIA)]
    out: dict = {"n_films": len(films), "n_read": len(read),
                 "n_clusters": len({f.cluster for f in read}),
                 "not_assessed": {"rate": len(films) and (len(films) - len(assessed)) / len(films),
                                  "by_reason": dict(Counter(f.reason or "unknown" for f in films
                                                            if f.label == "NOT_ASSESSED"))},
                 "unsure_rate": (sum(f.label == "UNSURE" for f in assessed) / len(assessed)) if assessed else math.nan}
    if not read:
        return out | {"metrics": None}
    y = np.array([f.read == PNEUMONIA for f in read], int)
    p = np.array([f.probability for f in read])
    pred = np.array([f.predicted for f in read], bool)
    out["metrics"] = cluster_bootstrap(y, p, pred, [f.cluster for f in read], n_resamples=n_resamples, seed=seed)
    out["confusion"] = metrics.confusion(y, pred.astype(int))
    decided = np.array([f.label in (NORMAL, PNEUMONIA) for f in read])
    n_dec = int(decided.sum())
    out["decided"] = {"n": n_dec, "accuracy": float((pred[decided] == y[decided]).mean()) if n_dec else math.nan,
                      "ci": list(metrics.proportion_ci(int((pred[decided] == y[decided]).sum()), n_dec))
                      if n_dec else [math.nan, math.nan]}
    return out


def site_report(films: Sequence[SiteFilm], *, n_resamples: int = 1000, seed: int = 0,
                min_group: int = MIN_GROUP) -> dict:
    """The whole report: overall, by month and by device (groups with at least ``min_group`` read
    films), and the disagreements (decided films whose class differs from the read)."""
    films = list(films)
    report = {"overall": _summary(films, n_resamples, seed), "min_group": min_group,
              "n_unread": sum(f.read is None for f in films),
              "n_reader_not_assessable": sum(f.read == NOT_ASSESSABLE for f in films),
              "thresholds": sorted({round(f.threshold, 6) for f in films}),
              "model_versions": sorted({f.model_version for f in films if f.model_version})}
    for key, name in ((lambda f: f.when.strftime("%Y-%m") if f.when else "unknown", "by_month"),
                      (lambda f: f.device or "unknown", "by_device")):
        groups: dict[str, list[SiteFilm]] = defaultdict(list)
        for f in films:
            groups[key(f)].append(f)
        report[name] = {g: _summary(fs, n_resamples, seed) for g, fs in sorted(groups.items())
                        if sum(x.read in (NORMAL, PNEUMONIA) for x in fs) >= min_group}
        report[name + "_too_small"] = sorted(g for g, fs in groups.items() if g not in report[name])
    report["disagreements"] = [f.film for f in films if f.label in (NORMAL, PNEUMONIA)
                               and f.read in (NORMAL, PNEUMONIA) and f.label != f.read]
    return report


def arrays(films: Sequence[SiteFilm]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reads as 0/1, probabilities, thresholds) of the assessed films with a NORMAL/PNEUMONIA read."""
    read = [f for f in films if f.label != "NOT_ASSESSED" and f.read in (NORMAL, PNEUMONIA)]
    return (np.array([f.read == PNEUMONIA for f in read], int), np.array([f.probability for f in read]),
            np.array([f.threshold for f in read]))


def _ci_text(m: dict) -> str:
    v, (lo, hi) = m["value"], m["ci"]
    return "n/a" if math.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(report: dict, source: str) -> str:
    """``site_report.md``: the overall table, then one line per month and device."""
    o = report["overall"]
    lines = [f"# Site report\n\nData: {source}; {o['n_read']} read films of {o['n_clusters']} patients "
             f"({o['n_films']} scored, {report['n_unread']} unread, {report['n_reader_not_assessable']} not "
             f"assessable for the reader); threshold(s) {report['thresholds']}; 95% CIs by cluster bootstrap "
             "over patients.\n", "| metric | value [95% CI] |", "| --- | --- |"]
    if o.get("metrics"):
        lines += [f"| {k} | {_ci_text(o['metrics'][k])} |" for k in METRICS]
        d = o["decided"]
        lines.append(f"| accuracy on decided films (n={d['n']}) | {d['accuracy']:.3f} "
                     f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] |")
    lines.append(f"| UNSURE rate | {o['unsure_rate']:.3f} |")
    lines.append(f"| NOT_ASSESSED rate | {o['not_assessed']['rate']:.3f} {o['not_assessed']['by_reason']} |")
    for name in ("by_month", "by_device"):
        for g, s in report[name].items():
            if s.get("metrics"):
                m = s["metrics"]
                lines.append(f"\n{name[3:]} {g}: n={s['n_read']}, accuracy {_ci_text(m['accuracy'])}, sensitivity "
                             f"{_ci_text(m['sensitivity'])}, specificity {_ci_text(m['specificity'])}")
        if report[name + "_too_small"]:
            lines.append(f"\n{name[3:]}s with fewer than {report['min_group']} read films (no row): "
                         f"{len(report[name + '_too_small'])}")
    return "\n".join(lines) + "\n"


def write(report: dict, films: Sequence[SiteFilm], out_dir, source: str, gallery: Sequence[tuple[str, str]] = ()):
    """``out_dir``: site_report.json and .md, the plots, and a self-contained report.html (images
    inlined as data: URLs, as ``evaluate --report``). ``gallery``: (caption, png path) of the
    disagreements' Grad-CAM overlays, when the films were reachable."""
    import json
    from pathlib import Path

    from pneumoscan.core.files import write_text
    from pneumoscan.evaluation import plots
    from pneumoscan.evaluation.report import data_uri, write_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "site_report.json", json.dumps(report, indent=1, default=str, allow_nan=True))
    md = markdown(report, source)
    write_text(out / "site_report.md", md)
    y, p, t = arrays(films)
    figures = []
    if y.size:
        threshold = float(np.median(t))
        cm = metrics.confusion(y, (p >= t).astype(int))
        figures = [plots.confusion_matrix_plot(cm, out / "confusion_matrix.png", title="Site: model vs reads"),
                   plots.reliability_diagram(y, p, out / "reliability.png", n_bins=10),
                   plots.roc_plot(y, p, out / "roc.png", threshold=threshold, title="Site ROC (reads as truth)")]
    write_html(out / "report.html", {
        "lines": [(line.startswith("|"), line) for line in md.splitlines() if line.strip()],
        "images": [(f.stem, data_uri(f)) for f in figures],
        "cards": [(uri, caption) for caption, uri in ((c, data_uri(path)) for c, path in gallery) if uri],
        "n_disagreements": len(report["disagreements"])}, SITE_TEMPLATE)
    return out
