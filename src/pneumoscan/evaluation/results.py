"""Typed evaluation results: what ``evaluate.evaluate_predictions`` measured, kept in memory.

Cross-validation pools its folds and an experiment grid compares its runs from these values, not
by parsing metrics.json and predictions.csv back. The files stay what people and other tools read:
``Evaluation.to_dict`` is metrics.json (its keys are quoted in tests and docs), ``Evaluation.save``
writes both files and ``Evaluation.load`` reads them back. That pair is the one place their
format is known; reading back is for work finished earlier (a fold or member kept on resume).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pneumoscan.core import metrics
from pneumoscan.core.files import write_csv, write_json

METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.csv"
PREDICTION_COLUMNS = ["path", "label", "probability", "prediction", "decision", "flags"]
POINT_KEYS = ("n", "threshold", *metrics.METRIC_KEYS)


def _pair(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = values
    return float("nan" if lo is None else lo), float("nan" if hi is None else hi)


@dataclass(frozen=True)
class Confusion:
    """Counts at the threshold; rows are the true class (NORMAL, PNEUMONIA), as metrics.json writes them."""

    tn: int
    fp: int
    fn: int
    tp: int

    @classmethod
    def from_matrix(cls, matrix: Sequence[Sequence[int]]) -> Confusion:
        (tn, fp), (fn, tp) = matrix
        return cls(int(tn), int(fp), int(fn), int(tp))

    def matrix(self) -> list[list[int]]:
        return [[self.tn, self.fp], [self.fn, self.tp]]


@dataclass(frozen=True)
class Metrics:
    """The numbers at one threshold on one set of films, each with its 95% interval, the
    interval's method (Wilson for rates, bootstrap for the rest) and, where it is nan, why."""

    n: int
    threshold: float
    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    roc_auc: float
    pr_auc: float
    loss: float
    confusion: Confusion
    ci95: Mapping[str, tuple[float, float]]
    ci_method: Mapping[str, str]
    ci_notes: Mapping[str, str]

    @classmethod
    def measure(cls, y_true, prob, threshold: float, *, n_bootstrap: int = 2000, seed: int = 0) -> Metrics:
        point = metrics.binary_metrics(y_true, prob, threshold)
        intervals = metrics.confidence_intervals(y_true, prob, threshold, n_resamples=n_bootstrap, seed=seed)
        return cls.from_dict(point | {"ci95": intervals["ci"], "ci_method": intervals["method"],
                                      "ci_notes": intervals["note"]})

    @classmethod
    def from_dict(cls, d: Mapping) -> Metrics:
        return cls(**{k: (int if k == "n" else float)(d[k]) for k in POINT_KEYS},
                   confusion=Confusion.from_matrix(d["confusion_matrix"]),
                   ci95={k: _pair(v) for k, v in d.get("ci95", {}).items()},
                   ci_method=dict(d.get("ci_method", {})), ci_notes=dict(d.get("ci_notes", {})))

    def point_dict(self) -> dict:
        return {k: getattr(self, k) for k in POINT_KEYS} | {"confusion_matrix": self.confusion.matrix()}

    def interval_dict(self) -> dict:
        return {"ci95": {k: list(v) for k, v in self.ci95.items()}, "ci_method": dict(self.ci_method),
                "ci_notes": dict(self.ci_notes)}

    def to_dict(self) -> dict:
        return self.point_dict() | self.interval_dict()


@dataclass(frozen=True)
class SubtypeRecall:
    """Recall of the PNEUMONIA films of one subtype (from their file names), Wilson 95% CI."""

    recall: float
    n: int
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {"recall": self.recall, "n": self.n, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class Flagged:
    """How many films each flag caught (by true class), and the metrics without the NOT_ASSESSED ones."""

    n_not_assessed: int
    n_assessed: int
    by_flag: Mapping[str, Mapping[str, int]]
    assessed_metrics: Metrics | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> Flagged:
        kept = d.get("assessed_metrics")
        return cls(int(d["n_not_assessed"]), int(d["n_assessed"]),
                   {code: dict(counts) for code, counts in d["by_flag"].items()},
                   Metrics.from_dict(kept) if kept is not None else None)

    def to_dict(self) -> dict:
        out: dict = {"n_not_assessed": self.n_not_assessed, "n_assessed": self.n_assessed,
                     "by_flag": {code: dict(counts) for code, counts in self.by_flag.items()}}
        if self.assessed_metrics is not None:
            out["assessed_metrics"] = self.assessed_metrics.to_dict()
        return out


@dataclass(frozen=True)
class Selective:
    """The UNSURE band that was used (and how it was fitted), coverage, and the metrics on the
    decided films (neither UNSURE nor NOT_ASSESSED), each with its Wilson 95% CI."""

    band: tuple[float, float]
    band_fitted: Mapping[str, Any]
    data: str
    decided: str
    n: int
    n_decided: int
    threshold: float
    coverage: float
    coverage_ci95: tuple[float, float]
    accuracy: float
    accuracy_ci95: tuple[float, float]
    sensitivity: float
    sensitivity_ci95: tuple[float, float]
    specificity: float
    specificity_ci95: tuple[float, float]
    undecided_by_class: Mapping[str, int]
    ci_method: str

    @classmethod
    def from_dict(cls, d: Mapping) -> Selective:
        values = {k: d[k] for k in cls.__dataclass_fields__}
        values |= {k: _pair(d[k]) for k in ("band", "coverage_ci95", "accuracy_ci95", "sensitivity_ci95",
                                            "specificity_ci95")}
        values |= {"band_fitted": dict(d["band_fitted"]), "undecided_by_class": dict(d["undecided_by_class"])}
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
                for k, v in ((k, getattr(self, k)) for k in self.__dataclass_fields__)}


@dataclass(frozen=True, eq=False)
class Predictions:
    """predictions.csv as arrays, one entry per film: ``probability`` as written (six decimals,
    so a fold read back on resume pools exactly as one kept in memory, and as cv did when it parsed
    the file), ``prediction`` the threshold's class (from the full-precision probability),
    ``decision`` the label (NORMAL, PNEUMONIA, UNSURE, NOT_ASSESSED), ``flags`` the flag codes."""

    paths: tuple[str, ...]
    label: np.ndarray
    probability: np.ndarray
    prediction: np.ndarray
    decision: tuple[str, ...]
    flags: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, paths: Sequence[str], y_true, prob, threshold: float, decisions: Sequence[str],
           flags: Sequence[Sequence[str]]) -> Predictions:
        prob = np.asarray(prob, dtype=float)
        return cls(tuple(map(str, paths)), np.asarray(y_true).astype(int),
                   np.array([float(f"{q:.6f}") for q in prob]), (prob >= threshold).astype(int),
                   tuple(decisions), tuple(tuple(f) for f in flags))

    def rows(self) -> list[tuple]:
        return [(p, int(t), f"{q:.6f}", int(k), d, ";".join(f)) for p, t, q, k, d, f in
                zip(self.paths, self.label, self.probability, self.prediction, self.decision, self.flags)]

    @classmethod
    def read(cls, path: Path) -> Predictions:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return cls(tuple(r["path"] for r in rows), np.array([int(r["label"]) for r in rows], dtype=int),
                   np.array([float(r["probability"]) for r in rows], dtype=float),
                   np.array([int(r["prediction"]) for r in rows], dtype=int), tuple(r["decision"] for r in rows),
                   tuple(tuple(r["flags"].split(";")) if r["flags"] else () for r in rows))

    def __len__(self) -> int:
        return len(self.paths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Predictions):
            return NotImplemented
        return (self.paths, self.decision, self.flags) == (other.paths, other.decision, other.flags) and all(
            np.array_equal(a, b) for a, b in ((self.label, other.label), (self.probability, other.probability),
                                              (self.prediction, other.prediction)))


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One set of films scored at one threshold: the metrics with their CIs, calibration (Brier,
    ECE), recall per subtype, the flag and UNSURE blocks when they apply, and every film's result.

    ``threshold_rule`` says how the threshold was chosen (a model's rule, or ``--threshold``) when
    the caller knows it; ``extra`` holds other keys stored in metrics.json as they are (e.g. the
    training-overlap count, an ensemble's member scores).
    """

    metrics: Metrics
    brier: float
    ece: float
    recall_by_subtype: Mapping[str, SubtypeRecall]
    predictions: Predictions
    flagged: Flagged | None = None
    selective: Selective | None = None
    threshold_rule: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.metrics.n

    @property
    def threshold(self) -> float:
        return self.metrics.threshold

    def value(self, key: str) -> float:
        """A headline number by its metrics.json key: a metric of ``Metrics``, ``brier`` or ``ece``."""
        return getattr(self, key) if key in ("brier", "ece") else getattr(self.metrics, key)

    def to_dict(self) -> dict:
        """metrics.json: the point metrics, ``extra``, the intervals, calibration and the blocks."""
        out = self.metrics.point_dict()
        if self.threshold_rule is not None:
            out["threshold_rule"] = self.threshold_rule
        out |= dict(self.extra) | self.metrics.interval_dict()
        out |= {"brier": self.brier, "ece": self.ece,
                "recall_by_subtype": {k: v.to_dict() for k, v in self.recall_by_subtype.items()}}
        if self.flagged is not None:
            out["flagged"] = self.flagged.to_dict()
        if self.selective is not None:
            out["selective"] = self.selective.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping, predictions: Predictions) -> Evaluation:
        known = {*POINT_KEYS, "confusion_matrix", "ci95", "ci_method", "ci_notes", "brier", "ece",
                 "recall_by_subtype", "flagged", "selective", "threshold_rule"}
        return cls(metrics=Metrics.from_dict(d), brier=float(d["brier"]), ece=float(d["ece"]),
                   recall_by_subtype={k: SubtypeRecall(float(v["recall"]), int(v["n"]), _pair(v["ci95"]))
                                      for k, v in d.get("recall_by_subtype", {}).items()},
                   predictions=predictions,
                   flagged=Flagged.from_dict(d["flagged"]) if "flagged" in d else None,
                   selective=Selective.from_dict(d["selective"]) if "selective" in d else None,
                   threshold_rule=d.get("threshold_rule"), extra={k: v for k, v in d.items() if k not in known})

    def save(self, out_dir: str | Path) -> None:
        """metrics.json and predictions.csv in ``out_dir`` (each written atomically)."""
        out = Path(out_dir)
        write_json(out / METRICS_FILE, self.to_dict())
        write_csv(out / PREDICTIONS_FILE, PREDICTION_COLUMNS, self.predictions.rows())

    @classmethod
    def load(cls, out_dir: str | Path) -> Evaluation:
        """What ``save`` wrote, for work finished earlier; FileNotFoundError when either file is missing."""
        out = Path(out_dir)
        return cls.from_dict(json.loads((out / METRICS_FILE).read_text()), Predictions.read(out / PREDICTIONS_FILE))

    @staticmethod
    def read_metrics(out_dir: str | Path) -> dict:
        """metrics.json of ``out_dir`` as written ({} when there is none), for readers of finished
        runs that need only its numbers (``pneumoscan compare``), whatever version wrote it."""
        path = Path(out_dir) / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def saved_in(out_dir: str | Path) -> bool:
        out = Path(out_dir)
        return (out / METRICS_FILE).is_file() and (out / PREDICTIONS_FILE).is_file()

    def __eq__(self, other: object) -> bool:
        """Equal when metrics.json and predictions.csv would be (nan equals nan, as in the files)."""
        if not isinstance(other, Evaluation):
            return NotImplemented
        canonical = lambda e: json.dumps(e.to_dict(), sort_keys=True)  # noqa: E731
        return canonical(self) == canonical(other) and self.predictions == other.predictions

