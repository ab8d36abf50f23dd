"""One self-contained HTML page per evaluation, for readers who will not open a JSON file.

``report.html`` is rendered with Jinja2 from ``templates/report.html.j2`` and embeds every image
as a base64 data URI with inline CSS: it opens offline, can be mailed or attached to a ticket, and
keeps showing the same figures after the run folder moves. It only reads what an evaluation
already wrote (metrics.json, errors.csv, the PNGs) plus the model's meta; it computes nothing.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from pneumoscan import __version__
from pneumoscan.core import calibration
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.files import write_text
from pneumoscan.safety import decision

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"

# (metrics.json key, what a clinician calls it, one line of meaning)
METRIC_ROWS = (
    ("recall", "Sensitivity (recall)", "share of PNEUMONIA images flagged"),
    ("specificity", "Specificity", "share of NORMAL images passed as normal"),
    ("precision", "Precision (PPV)", "share of flagged images that are PNEUMONIA, at this prevalence"),
    ("accuracy", "Accuracy", "share of all images classified correctly, at this prevalence"),
    ("f1", "F1", "harmonic mean of precision and sensitivity"),
    ("roc_auc", "ROC-AUC", "ranking quality, independent of the threshold"),
    ("pr_auc", "PR-AUC (average precision)", "ranking quality for PNEUMONIA, depends on prevalence"),
    ("loss", "Log loss", "cross-entropy of the calibrated probabilities (lower is better)"),
    ("brier", "Brier score", "mean squared error of the probabilities (lower is better)"),
    ("ece", "Expected calibration error", "15 equal-width bins; gap between predicted and observed rate"),
)

OUTSIDE_ALERT = 0.5  # explain.OUTSIDE_ALERT; not imported, so a report renders without torch
CI_METHOD_NAMES = {"wilson": "Wilson", "clopper-pearson": "Clopper–Pearson", "bootstrap": "bootstrap"}

ERROR_TITLES = {"false_positive": "False positives (NORMAL flagged as PNEUMONIA)",
                "false_negative": "False negatives (PNEUMONIA missed)"}


def data_uri(path: str | Path) -> str | None:
    """A PNG as a ``data:`` URI, or None when the evaluation did not draw it."""
    path = Path(path)
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _flatten(config: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _fraction(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _errors(eval_dir: Path, confusion: list[list[int]]) -> list[dict]:
    by_kind: dict[str, list[dict]] = {kind: [] for kind in ERROR_TITLES}
    csv_path = eval_dir / "errors.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                outside, border = _fraction(row.get("cam_outside_lungs")), _fraction(row.get("cam_on_border"))
                by_kind.setdefault(row["kind"], []).append(
                    row | {"name": Path(row["path"]).name, "probability": float(row["probability"]),
                           "outside": outside, "border": border,
                           "shortcut": max(outside or 0, border or 0) > OUTSIDE_ALERT})
    (_, fp), (fn, _) = confusion
    totals = {"false_positive": fp, "false_negative": fn}
    return [{"kind": kind, "title": ERROR_TITLES.get(kind, kind.replace("_", " ")), "rows": rows,
             "total": totals.get(kind, len(rows)), "gallery": data_uri(eval_dir / "errors" / f"{kind}.png")}
            for kind, rows in by_kind.items()]


def _threshold_source(source: Mapping, meta: ModelMeta) -> str:
    """Where the cut-off came from, naming the model's own when a command-line value replaced it."""
    text = source.get("threshold_source") or f"model ({calibration.describe_rule(meta.threshold_rule)})"
    if text == "--threshold":
        return (f"--threshold on the command line (the model's own is {meta.threshold:.4f}, "
                f"{calibration.describe_rule(meta.threshold_rule)})")
    return text


def _stages(n: int | None) -> str:
    if n is None:
        return "not recorded"
    return {0: "none (frozen; only the head was trained)", -1: "all stages (fine-tuned end to end)"}.get(
        n, f"the last {n} stages (the rest frozen)")


def ensemble_summary(meta: ModelMeta) -> list[tuple[str, str]]:
    """A multi-member model in a reader's words: what each member is, and how they were combined."""
    rows = [("Ensemble", f"{len(meta.members)} members, the mean of their calibrated logits; temperature and "
                         "threshold fitted on the members' shared validation split")]
    for i, m in enumerate(meta.members, start=1):
        mc = m.config.get("model") or {}
        rows.append((f"Member {i}", f"{m.architecture}, head {m.head}, {m.normalization.name} normalisation, "
                                    f"backbone trained: {_stages(mc.get('unfreeze_blocks'))}; its temperature "
                                    f"{m.temperature:.3f}"))
    return rows


def training_summary(meta: ModelMeta) -> list[tuple[str, str]]:
    """How the model was trained, in a reader's words (the raw settings are in the full configuration)."""
    cfg, t = meta.config or {}, meta.training
    mc, tc, dc = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {})
    if meta.members:  # an ensemble's own config says only which runs it combined
        return ensemble_summary(meta)
    weights = meta.backbone_weights.get("source")
    rows = [("Backbone", f"{meta.architecture}, starting from "
                         + (f"pretrained weights ({Path(str(weights)).name})" if weights not in (None, "none")
                            else "random weights"))]
    if mc:
        trained = _stages(mc.get("unfreeze_blocks"))
        if tc.get("unfreeze_at"):
            trained += f", then more stages during training (schedule {tc['unfreeze_at']}: epoch:stages)"
        rows.append(("Backbone trained", trained))
    if t.fast_path:
        rows.append(("Head trained on", f"cached backbone features of {tc.get('views', '?')} augmented views of each "
                                        "training image (the backbone runs once, not every epoch)"))
    elif t.fast_path is not None:
        rows.append(("Trained on", f"every training image, freshly augmented each epoch ({dc.get('augment', '?')} "
                                   "augmentation)"))
    if t.n_train is not None:
        rows.append(("Images", f"{t.n_train} for training, {t.n_val} for validation (early stopping, calibration, "
                               "the threshold)"))
    if t.epochs_run is not None:
        best = f"; the weights kept are those of epoch {t.best_epoch}, the lowest validation loss" \
            if t.best_epoch is not None else ""
        rows.append(("Epochs", f"{t.epochs_run} run{best}"))
    if tc:
        rows.append(("Optimisation", f"learning rate {tc.get('lr')} for the head, {tc.get('backbone_lr')} for the "
                                     f"backbone, {tc.get('schedule')} schedule; class weights "
                                     f"{dc.get('class_weights', '?')}"))
    if t.seconds is not None:
        extra = f", plus {t.feature_seconds} s computing cached features" if t.fast_path and t.feature_seconds else ""
        rows.append(("Training time", f"{t.seconds} s ({t.seconds_per_epoch} s per epoch){extra}"))
    return rows


def _flagged(result: Mapping) -> dict | None:
    """The input checks' counts and the headline metrics without the NOT_ASSESSED images."""
    f = result.get("flagged")
    if not f:
        return None
    kept = f.get("assessed_metrics") or {}
    ci = kept.get("ci95", {})
    return {"n_not_assessed": f["n_not_assessed"], "n_assessed": f["n_assessed"],
            "by_flag": [{"code": code, "sentence": decision.SENTENCES.get(code, ""), **counts}
                        for code, counts in f["by_flag"].items() if sum(counts.values())],
            "metrics": [{"name": name, "value": kept.get(key), "ci": ci.get(key)} for key, name in
                        (("accuracy", "Accuracy"), ("recall", "Sensitivity"), ("specificity", "Specificity"),
                         ("roc_auc", "ROC-AUC")) if key in kept]}


def _band_text(meta: ModelMeta) -> str:
    u = meta.unsure
    if not u:
        return "none (every assessed film gets NORMAL or PNEUMONIA)"
    return (f"[{u['low']:.4f}, {u['high']:.4f}): {u.get('method', '?')} at {u.get('confidence', float('nan')):g} "
            f"confidence, {u.get('n_calibration', '?')} calibration films")


def _prior_text(meta: ModelMeta) -> str:
    p = meta.prior or {}
    if "site" not in p:
        return "none"
    return (f"site prevalence {p['site']:.3f} (95% CI {p['ci'][0]:.3f}–{p['ci'][1]:.3f}, {p['method']} on "
            f"{p['n_images']} unlabelled films) vs {p['calibration']:.3f} at calibration: logit offset "
            f"{p['logit_offset']:+.3f}")


def _selective(result: Mapping) -> dict | None:
    """Coverage and the metrics on the decided films (neither UNSURE nor NOT_ASSESSED), when the
    model has an UNSURE band."""
    sel = result.get("selective")
    if not sel:
        return None
    return {"band": sel["band"], "coverage": sel["coverage"], "coverage_ci": sel["coverage_ci95"],
            "n": sel["n"], "n_decided": sel["n_decided"], "threshold": sel["threshold"],
            "confidence": (sel.get("band_fitted") or {}).get("confidence"),
            "undecided": sel["undecided_by_class"],
            "metrics": [{"name": name, "value": sel[key], "ci": sel[f"{key}_ci95"]} for key, name in
                        (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"))]}


def _overlap(result: Mapping, source: Mapping) -> dict | None:
    """The training-data overlap banner, when the evaluation checked (or could not check) it."""
    if "n_in_training_data" not in result and "n_in_training_data" not in source:
        return None  # e.g. a training run's own test split, held out by construction
    n = result.get("n_in_training_data", source.get("n_in_training_data"))
    total = result.get("n_checked", source.get("n_checked", result.get("n")))
    if n is None:
        return {"level": "unknown", "text": "Overlap with this model's training data cannot be checked: the model "
                "file records no digests of its training files (it predates them; tools/add_data_digests.py adds "
                "them)."}
    if n:
        return {"level": "overlap", "text": f"{n} of {total} evaluated files were in this model's training data: "
                "these numbers are optimistic."}
    return {"level": "none", "text": f"None of the {total} evaluated files is in this model's training data "
            "(checked by file content)."}


def context(eval_dir: str | Path, meta: ModelMeta, source: Mapping, run_dir: str | Path | None = None) -> dict:
    """Everything the template shows, gathered from the evaluation folder, the meta and the run folder."""
    eval_dir = Path(eval_dir)
    result = json.loads((eval_dir / "metrics.json").read_text())
    ci = result.get("ci95", {})
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    n_normal, n_pneumonia = tn + fp, fn + tp
    run = Path(run_dir) if run_dir is not None else None
    in_run = run is not None and ((run / "curves.png").is_file() or (run / "history.csv").is_file())
    methods, notes = result.get("ci_method", {}), result.get("ci_notes", {})

    def interval(key: str) -> list | None:
        lo_hi = ci.get(key)
        if not lo_hi or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in lo_hi):
            return None
        return lo_hi

    metrics_rows = [{"key": key, "name": name, "help": help_, "value": result.get(key), "ci": interval(key),
                     "ci_method": CI_METHOD_NAMES.get(methods.get(key, "bootstrap" if key in ci else ""), ""),
                     "ci_note": notes.get(key)} for key, name, help_ in METRIC_ROWS if key in result]
    errors = _errors(eval_dir, result["confusion_matrix"])
    split = source.get("split")
    return {
        "title": f"pneumoscan evaluation: {meta.architecture}",
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "class_names": list(meta.class_names),
        "source": {
            "model": source.get("model", ""),
            "data": source.get("data", ""),
            "split": ", ".join(split) if isinstance(split, (list, tuple)) else (split or ""),
            "n_images": result["n"],
            "n_skipped": source.get("n_skipped", 0),
            "n_normal": n_normal,
            "n_pneumonia": n_pneumonia,
            "prevalence": n_pneumonia / result["n"] if result["n"] else math.nan,
            "threshold": result["threshold"],
            "threshold_source": _threshold_source(source, meta),
            "temperature": meta.temperature,
        },
        "headline": [{"name": name, "value": result.get(key), "ci": interval(key), "ci_note": notes.get(key)}
                     for key, name in (("roc_auc", "ROC-AUC"), ("recall", "Sensitivity"),
                                       ("specificity", "Specificity"))],
        "overlap": _overlap(result, source),
        "flagged": _flagged(result),
        "selective": _selective(result),
        "rate_ci_method": CI_METHOD_NAMES.get(methods.get("recall", ""), ""),
        "model": [
            ("architecture", meta.architecture), ("head", meta.head),
            ("image size", meta.image_size),
            ("input normalisation", meta.normalization.name),
            ("backbone weights", meta.backbone_weights.get("source")),
            ("decision threshold", _number(meta.threshold, 4)),
            ("threshold rule", meta.threshold_rule),
            ("temperature", _number(meta.temperature)),
            ("UNSURE band", _band_text(meta)),
            ("prevalence adaptation", _prior_text(meta)),
            ("pneumoscan / torch", f"{meta.pneumoscan_version} / {meta.torch_version or '?'}"),
        ],
        "config": _flatten(meta.config),
        "training": {
            "summary": training_summary(meta),
            "run_dir": str(run) if in_run else None,
            "curves": data_uri(run / "curves.png") if in_run else None,
        },
        "metrics": metrics_rows,
        "figures": {name: data_uri(eval_dir / f"{name}.png") for name in
                    ("confusion_matrix", "roc", "pr", "probability_histogram", "reliability")},
        "errors": errors,
        "n_errors": fp + fn,
        "shortcuts": [r for e in errors for r in e["rows"] if r["shortcut"]],
        "outside_alert": OUTSIDE_ALERT,
        "errors_written": (eval_dir / "errors.csv").is_file(),
        "subtypes": [{"name": k} | v for k, v in (result.get("recall_by_subtype") or {}).items()],
        "overall_recall": result.get("recall"),
    }


def environment() -> Environment:
    """The one escape policy of every HTML page pneumoscan writes: each value is autoescaped (file
    names, captions, device names and the data's own text can hold markup), and a name the template
    uses but the context lacks is an error, not a silent blank."""
    env = Environment(loader=PackageLoader("pneumoscan", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _number
    env.filters["pct"] = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"
    return env


def render(ctx: Mapping, template: str = TEMPLATE) -> str:
    return environment().get_template(template).render(**ctx)


def write_html(path: str | Path, ctx: Mapping, template: str = TEMPLATE) -> Path:
    """Render ``template`` (in ``pneumoscan/templates``) with ``ctx`` and write it atomically
    (temp file, then rename): a reader never opens half a page. Every HTML report goes through here."""
    out = write_text(path, render(ctx, template))
    log.debug("report: %s", out)
    return out


def write_report(eval_dir: str | Path, meta: ModelMeta, source: Mapping, *, run_dir: str | Path | None = None,
                 path: str | Path | None = None) -> Path:
    """Render ``report.html`` (default: inside ``eval_dir``) from one evaluation folder.

    ``source`` says what was evaluated (keys of evaluation.json: model, data, split, n_skipped,
    threshold_source); ``run_dir`` is the training run folder, whose curves are shown when present.
    """
    out = Path(path) if path is not None else Path(eval_dir) / "report.html"
    return write_html(out, context(eval_dir, meta, source, run_dir))
