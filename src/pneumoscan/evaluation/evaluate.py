"""Running a model over images and writing honest metrics: JSON with CIs, predictions, plots.

Besides the headline metrics, an evaluation says how the model fails: calibration (Brier, ECE,
reliability diagram), recall per pneumonia subtype where file names carry one, and the most
confident errors with their Grad-CAM maps (``errors.csv`` and ``errors/``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.stats import binomtest

from pneumoscan import CLASS_NAMES
from pneumoscan.modeling import artifact
from pneumoscan.io import data
from pneumoscan.evaluation import explain, plots
from pneumoscan.core import calibration, conformal, metrics
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import content_digest, write_csv, write_json
from pneumoscan.evaluation.results import Evaluation, Flagged, Metrics, Predictions, Selective, SubtypeRecall
from pneumoscan.safety import decision
from pneumoscan.inference.loading import load_engine

log = logging.getLogger(__name__)

ECE_BINS = 15
ERROR_KINDS = ("false_positive", "false_negative")
SUBTYPES = ("bacteria", "virus")
_SUBTYPE = re.compile(r"(?:^|[_\-.\s])(" + "|".join(SUBTYPES) + r")(?=[_\-.\s]|$)", re.IGNORECASE)


def evaluate_predictions(y_true: np.ndarray, prob: np.ndarray, threshold: float, out_dir: str | Path,
                         paths: Sequence[str], *, n_bootstrap: int = 2000, seed: int = 0,
                         flags: Sequence[Sequence[str]] | None = None, extra: dict | None = None,
                         unsure: dict | None = None, threshold_rule: str | None = None) -> Evaluation:
    """Measure one set of predictions; write metrics.json, predictions.csv and the plots; return
    the typed ``Evaluation`` (callers use it in memory rather than reading the files back).

    The metrics cover every image, as the model scored it. With ``flags`` (per image, from
    ``inference.decision``) they also say how many images were flagged and what the metrics are on
    the images the model did assess, i.e. without the NOT_ASSESSED ones. With ``unsure`` (the
    model's band, ``ModelMeta.unsure``) metrics.json gets a ``selective`` block: coverage and the
    metrics on the decided films (``metrics.selective_metrics``). ``extra`` (e.g.
    ``training_overlap``'s keys) is stored in metrics.json too; ``threshold_rule`` says how the
    threshold was chosen, where the caller knows it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = [tuple(f) for f in flags] if flags is not None else [()] * len(prob)
    flagged = selective = band = None
    if any(flags):
        flagged = Flagged.from_dict(flag_summary(y_true, prob, threshold, flags, n_bootstrap=n_bootstrap, seed=seed))
    if unsure:
        band = conformal.band_with_threshold(float(unsure["low"]), float(unsure["high"]), threshold)
    labels = [decision.label_for(q, threshold, f, band, CLASS_NAMES) for q, f in zip(prob, flags)]
    if unsure:
        decided = [label not in (decision.NOT_ASSESSED, decision.UNSURE) for label in labels]
        selective = Selective.from_dict(selective_block(y_true, prob, threshold, decided, unsure, band))
    result = Evaluation(
        metrics=Metrics.measure(y_true, prob, threshold, n_bootstrap=n_bootstrap, seed=seed),
        brier=metrics.brier(y_true, prob), ece=metrics.expected_calibration_error(y_true, prob, n_bins=ECE_BINS),
        recall_by_subtype={k: SubtypeRecall(v["recall"], v["n"], tuple(v["ci95"]))
                           for k, v in recall_by_subtype(paths, y_true, prob, threshold).items()},
        predictions=Predictions.of(paths, y_true, prob, threshold, labels, flags),
        flagged=flagged, selective=selective, threshold_rule=threshold_rule, extra=dict(extra or {}))
    result.save(out)
    plots.confusion_matrix_plot(result.metrics.confusion.matrix(), out / "confusion_matrix.png")
    if len(set(y_true.tolist())) == 2:
        plots.roc_plot(y_true, prob, out / "roc.png", threshold=threshold)
        plots.pr_plot(y_true, prob, out / "pr.png", threshold=threshold)
    plots.probability_histogram(y_true, prob, out / "probability_histogram.png", threshold=threshold)
    plots.reliability_diagram(y_true, prob, out / "reliability.png", n_bins=ECE_BINS)
    return result


def selective_block(y_true, prob, threshold: float, decided, unsure: dict, band: tuple[float, float]) -> dict:
    """metrics.json's ``selective``: the band that was used (and how it was fitted), coverage, and
    accuracy, sensitivity and specificity on the decided films with Wilson 95% CIs."""
    fitted = {k: unsure[k] for k in ("method", "confidence", "n_calibration", "class_counts", "fitted_on")
              if k in unsure}
    return {"band": [band[0], band[1]], "band_fitted": fitted, "data": "the films evaluated here",
            "decided": "neither UNSURE nor NOT_ASSESSED"} | metrics.selective_metrics(y_true, prob, threshold, decided)


def flag_summary(y_true, prob, threshold: float, flags: Sequence[Sequence[str]], *, n_bootstrap: int = 2000,
                 seed: int = 0) -> dict:
    """How many images each flag caught, by class, and the metrics without the NOT_ASSESSED ones."""
    y, p = np.asarray(y_true).astype(int), np.asarray(prob, dtype=float)
    blocking = decision.not_competent()
    assessed = np.array([not any(f in blocking for f in fs) for fs in flags])
    out: dict = {"n_not_assessed": int((~assessed).sum()), "n_assessed": int(assessed.sum()),
                 "by_flag": {code: {name: int(sum(code in fs for fs, t in zip(flags, y) if t == label))
                                    for label, name in enumerate(CLASS_NAMES)} for code in decision.FLAGS}}
    if assessed.any() and len(set(y[assessed].tolist())) == 2:
        kept = metrics.binary_metrics(y[assessed], p[assessed], threshold)
        intervals = metrics.confidence_intervals(y[assessed], p[assessed], threshold, n_resamples=n_bootstrap,
                                                 seed=seed)
        out["assessed_metrics"] = kept | {"ci95": intervals["ci"], "ci_method": intervals["method"],
                                          "ci_notes": intervals["note"]}
    return out


def training_overlap(meta: ModelMeta, paths: Sequence[str | Path]) -> dict:
    """How many evaluated files the model was trained (or validated) on, found by content.

    ``{"n_in_training_data": k, "n_checked": n}``; k is None when the model records no digests of
    its training data (a model.pt older than ``ModelMeta.data_digests``): overlap cannot be checked.
    Logged as a warning either way, because metrics on seen images are optimistic.
    """
    if not meta.data_digests:
        log.warning("this model records no digests of its training data: overlap of the %d evaluated files "
                    "with it cannot be checked", len(paths))
        return {"n_in_training_data": None, "n_checked": len(paths)}
    seen = set(meta.data_digests)
    n = sum(content_digest(p) in seen for p in paths)
    if n:
        log.warning("%s", overlap_sentence(n, len(paths)))
    return {"n_in_training_data": int(n), "n_checked": len(paths)}


def overlap_sentence(n_in_training: int | None, n: int) -> str:
    """The warning line the log, the CLI and the report share."""
    if n_in_training is None:
        return "overlap with this model's training data cannot be checked (the model records no digests of it)"
    return f"{n_in_training} of {n} evaluated files were in this model's training data: these numbers are optimistic"


def subtype_of(path: str | Path) -> str | None:
    """The pneumonia subtype a Kaggle file name carries (``person1_bacteria_2.jpeg``), if any."""
    m = _SUBTYPE.search(Path(path).stem)
    return m.group(1).lower() if m else None


def recall_by_subtype(paths: Sequence[str], y_true, prob, threshold: float) -> dict[str, dict]:
    """Recall of the PNEUMONIA images of each subtype, with a Wilson 95% interval.

    Viral pneumonia is subtler on an X-ray than bacterial; one overall recall can hide that the
    model misses most of one kind. Only PNEUMONIA images count (recall is undefined for the
    others); subtypes absent from the names are absent from the result, which is {} when none is
    found. Wilson rather than the bootstrap: a single proportion has a closed-form interval that
    stays sensible at small n.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    found: dict[str, list[bool]] = {}
    for path, label, q in zip(paths, y, p):
        kind = subtype_of(path) if label == 1 else None
        if kind:
            found.setdefault(kind, []).append(bool(q >= threshold))
    result = {}
    for kind in sorted(found):
        hits, n = sum(found[kind]), len(found[kind])
        ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        result[kind] = {"recall": hits / n, "n": n, "ci95": [float(ci.low), float(ci.high)]}
    return result


def select_errors(y_true, prob, threshold: float, k: int = 16) -> dict[str, np.ndarray]:
    """Indices of the k most confident errors of each kind, most confident first.

    False positives (NORMAL predicted PNEUMONIA) by highest probability, false negatives
    (PNEUMONIA predicted NORMAL) by lowest: the cases a reader should look at first, because the
    model was most sure and most wrong. Ties keep the input order.
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    positive = p >= threshold
    fp = np.flatnonzero((y == 0) & positive)
    fn = np.flatnonzero((y == 1) & ~positive)
    k = max(int(k), 0)
    return {"false_positive": fp[np.argsort(-p[fp], kind="stable")][:k],
            "false_negative": fn[np.argsort(p[fn], kind="stable")][:k]}


ERROR_COLUMNS = ["path", "label", "probability", "kind", "rank", "cam_outside_lungs", "cam_on_border"]


def write_errors(model, meta: ModelMeta, images: np.ndarray, y_true, prob, threshold: float,
                 paths: Sequence[str], out_dir: str | Path, *, k: int = 16, method: str = "gradcam") -> dict:
    """``errors.csv`` (ERROR_COLUMNS) and, when ``model`` (the PyTorch Classifier) is given, the
    Grad-CAM galleries in ``errors/``. The cam_ columns are the share of each map's mass outside
    the lung fields and on the image border (``explain.mass_fractions``): empty when the errors are
    not explained (no model, or a flat map)."""
    out = Path(out_dir)
    chosen = select_errors(y_true, prob, threshold, k)
    n_fp, n_fn = len(chosen["false_positive"]), len(chosen["false_negative"])
    fractions: dict[int, tuple[float | None, float | None]] = {}
    galleries: dict = {}
    if model is not None:
        # called without errors too: it clears the galleries of an earlier evaluation
        galleries = explain.error_galleries(model, meta, images, np.asarray(prob), paths, chosen, out / "errors",
                                            method, fractions=fractions)

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    rows = [(paths[i], int(y_true[i]), f"{prob[i]:.6f}", kind, rank, *map(cell, fractions.get(int(i), (None, None))))
            for kind in ERROR_KINDS for rank, i in enumerate(chosen[kind], start=1)]
    write_csv(out / "errors.csv", ERROR_COLUMNS, rows)
    if not n_fp + n_fn:
        log.info("errors: none at threshold %.3f, nothing to explain", threshold)
    elif model is None:
        log.info("errors: %d false positives, %d false negatives listed in %s", n_fp, n_fn, out / "errors.csv")
    else:
        log.info("errors: %d false positives, %d false negatives explained in %s", n_fp, n_fn, out / "errors")
        shortcuts = [i for i, (o, b) in fractions.items() if max(o or 0, b or 0) > explain.OUTSIDE_ALERT]
        if shortcuts:
            log.warning("errors: %d of %d explained maps have most of their mass outside the lung fields or on "
                        "the border (a shortcut?): see the cam_ columns of %s", len(shortcuts), len(fractions),
                        out / "errors.csv")
    return galleries


def select_split(samples: list[data.Sample], split: str | None) -> list[data.Sample]:
    """Evaluate on ``test`` when the data has one, else on everything found (a plain class folder)."""
    present = sorted({s.split for s in samples})
    split = split or ("test" if "test" in present else None)
    if split is None:
        if len(present) > 1:
            raise UserError(f"data has splits {present} but no 'test'; choose one with --split")
        return samples
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        raise UserError(f"no '{split}' split in the data (found: {', '.join(present)})")
    return chosen


def run(model_path: str | Path | None, data_root: str | Path, out_dir: str | Path, *, threshold: float | None = None,
        split: str | None = None, strict: bool = False, n_bootstrap: int = 2000, engine: str = "auto",
        decode_progress: Callable[[int], None] | None = None, errors: int = 16, method: str = "gradcam",
        report: bool = False) -> Evaluation:
    """Evaluate a model file (``None``: the bundled model) on labelled images, scored by the same
    ``engine`` that ``predict`` and ``serve`` use; the ``errors`` most confident mistakes of each
    kind are explained with ``method`` (0 = none), and ``report`` adds OUT/report.html."""
    if errors > 0:
        explain.check_method(method)  # before minutes of decoding, not after
    model_path = artifact.resolve(model_path)
    scorer = load_engine(model_path, engine)
    meta = scorer.meta
    samples = select_split(data.scan(data_root, default_split="test"), split)
    kept, decoded = data.decode_samples(samples, meta.image_size, strict=strict, progress=decode_progress)
    images, skipped = decoded.images, decoded.skipped
    out = Path(out_dir)
    if skipped:
        data.write_skipped(skipped, out / "skipped.csv")
    verdicts = decision.assess(scorer, images, decoded.sizes, threshold=threshold)
    prob = np.array([v.probability for v in verdicts])
    y = np.array([s.label for s in kept])
    thr = meta.threshold if threshold is None else float(threshold)
    overlap = training_overlap(meta, [s.path for s in kept])
    rule = "--threshold" if threshold is not None else meta.threshold_rule
    result = evaluate_predictions(y, prob, thr, out, [s.path for s in kept], n_bootstrap=n_bootstrap,
                                  flags=[v.flags for v in verdicts], extra=overlap, unsure=meta.unsure,
                                  threshold_rule=rule)
    if errors > 0:
        write_errors(_cam_model(scorer), meta, images, y, prob, thr, [s.path for s in kept], out, k=errors,
                     method=method)
    evaluation = {
        "model": str(model_path),
        "model_sha256": scorer.sha256,
        "runtime": scorer.name,
        "data": str(data_root),
        "split": split or sorted({s.split for s in kept}),
        "n_images": len(kept),
        "n_skipped": len(skipped),
        **overlap,
        "threshold": thr,
        "threshold_source": "--threshold" if threshold is not None else f"model ({calibration.describe_rule(meta.threshold_rule)})",
        "class_names": list(CLASS_NAMES),
    }
    write_json(out / "evaluation.json", evaluation)
    log.info("evaluated %d images from %s with %s: %s", len(kept), data_root, scorer.name, summary_line(result))
    if result.selective is not None:
        log.info("%s", selective_line(result.selective))
    if result.flagged is not None:
        f = result.flagged
        log.warning("%d of %d images NOT_ASSESSED (%s); metrics without them are in metrics.json (flagged)",
                    f.n_not_assessed, len(kept), ", ".join(f"{code} {sum(n.values())}" for code, n in f.by_flag.items()
                                                           if sum(n.values())))
    if report:
        from pneumoscan.evaluation import report as html_report

        html_report.write_report(out, meta, evaluation, run_dir=model_path.parent)
    return result


def _cam_model(scorer):
    """The PyTorch model behind an engine, for Grad-CAM; None for a bare ONNX file."""
    if getattr(scorer, "model", None) is not None:
        return scorer.model
    if scorer.path.suffix.lower() == ".pt":
        return artifact.load(scorer.path)[0]
    log.warning("%s is an ONNX file: the errors are listed in errors.csv but not explained (Grad-CAM needs "
                "the model.pt)", scorer.path.name)
    return None


def selective_line(sel: Selective) -> str:
    """One line on the decided films, as the log and the report word it."""
    lo, hi = sel.accuracy_ci95
    return (f"decided {sel.n_decided} of {sel.n} films (coverage {sel.coverage:.3f}; UNSURE band "
            f"[{sel.band[0]:.3f}, {sel.band[1]:.3f})): accuracy on them {sel.accuracy:.3f} [{lo:.3f}, {hi:.3f}] "
            f"at threshold {sel.threshold:.3f}")


def summary_line(result: Evaluation) -> str:
    m = result.metrics

    def fmt(key: str) -> str:
        value = getattr(m, key)
        lo, hi = m.ci95.get(key, (float("nan"), float("nan")))
        if lo != lo and key in m.ci_notes:  # nan: say so rather than "[nan, nan]"
            return f"{key} {value:.3f} [CI not estimable]"
        return f"{key} {value:.3f} [{lo:.3f}, {hi:.3f}]"

    keys = ("accuracy", "roc_auc", "recall", "specificity")
    return f"n={m.n}, threshold {m.threshold:.3f}: " + ", ".join(fmt(k) for k in keys)
