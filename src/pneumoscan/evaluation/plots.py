"""Every figure the project draws.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` API and never touch
``pyplot``: there is no global figure registry to leak memory into, no backend to choose, and
the functions are safe to call from worker threads.
Each function writes one PNG atomically, so a crash or a reader polling the run folder never
sees half a file.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pneumoscan import CLASS_NAMES
from pneumoscan.core.files import atomic_path

log = logging.getLogger(__name__)

DPI = 110
CLASS_COLORS = ("tab:blue", "tab:red")  # NORMAL, PNEUMONIA — the same in every figure
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG through ``files.atomic_path`` (unique temporary name, then
    ``os.replace``), so two threads drawing the same file cannot trample each other's temp file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    log.debug("wrote %s", path)
    return path


def _arrays(y_true: Iterable[Any], prob: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=int).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}")
    return y, p


def _both_classes(y: np.ndarray) -> bool:
    """ROC and PR curves are undefined with one class; draw an explanatory empty plot instead of crashing."""
    return np.unique(y).size == 2


def _no_curve(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")


def confusion_matrix_plot(
    cm: Sequence[Sequence[int]] | np.ndarray,
    path: str | os.PathLike[str],
    class_names: Sequence[str] = CLASS_NAMES,
    title: str = "Confusion matrix",
) -> Path:
    """Counts plus row percentages: the row percentage of the PNEUMONIA row is the sensitivity,
    of the NORMAL row the specificity — the two numbers a clinician asks for first."""
    cm = np.asarray(cm, dtype=int)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.1%}", ha="center", va="center", color=color)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return save_figure(fig, path)


def roc_plot(
    y_true: Iterable[int],
    prob: Iterable[float],
    path: str | os.PathLike[str],
    threshold: float | None = None,
    title: str = "ROC curve",
) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = _arrays(y_true, prob)
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
    if _both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"model (AUC = {roc_auc_score(y, p):.3f})")
        if threshold is not None:
            # Compute the point from the threshold itself, so it is exact even between curve vertices.
            pred = p >= threshold
            tpr_t = pred[y == 1].mean()
            fpr_t = pred[y == 0].mean()
            ax.plot(fpr_t, tpr_t, "o", color="black",
                    label=f"threshold {threshold:.3f} (sens {tpr_t:.2f}, spec {1 - fpr_t:.2f})")
    else:
        _no_curve(ax, "needs both classes")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def pr_plot(
    y_true: Iterable[int],
    prob: Iterable[float],
    path: str | os.PathLike[str],
    threshold: float | None = None,
    title: str = "Precision–recall curve",
) -> Path:
    """The prevalence line is what a useless classifier scores, so AP is read against it, not against 0."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, p = _arrays(y_true, prob)
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot()
    if _both_classes(y):
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", lw=2,
                label=f"model (AP = {average_precision_score(y, p):.3f})")
        prevalence = float(y.mean())
        ax.axhline(prevalence, ls="--", color="gray", lw=1, label=f"prevalence = {prevalence:.3f}")
        if threshold is not None:
            pred = p >= threshold
            tp = int((pred & (y == 1)).sum())
            rec_t = tp / int((y == 1).sum())
            prec_t = tp / int(pred.sum()) if pred.any() else 1.0
            ax.plot(rec_t, prec_t, "o", color="black",
                    label=f"threshold {threshold:.3f} (P {prec_t:.2f}, R {rec_t:.2f})")
    else:
        _no_curve(ax, "needs both classes")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
           title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def probability_histogram(
    y_true: Iterable[int],
    prob: Iterable[float],
    path: str | os.PathLike[str],
    threshold: float | None = None,
) -> Path:
    """Shows how well the classes separate and where the errors sit relative to the threshold."""
    y, p = _arrays(y_true, prob)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 26)
    for label, (name, color) in enumerate(zip(CLASS_NAMES, CLASS_COLORS)):
        values = p[y == label]
        ax.hist(values, bins=bins, alpha=0.55, color=color, label=f"{name} (n={values.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
    ax.set(xlim=(0, 1), xlabel=f"Predicted P({CLASS_NAMES[1]})", ylabel="Images",
           title="Predicted probability by true class")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _float(value: Any) -> float:
    """CSV cells and dict values may be missing, empty or 'nan'; all of them mean 'not logged'."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_history(history: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="") as f:
            rows: list[Mapping[str, Any]] = list(csv.DictReader(f))
    else:
        rows = list(history)
    columns = {key: np.array([_float(row.get(key)) for row in rows]) for key in HISTORY_KEYS}
    if rows and np.isnan(columns["epoch"]).all():
        columns["epoch"] = np.arange(len(rows), dtype=float)
    return columns


def training_curves(
    history_csv_or_rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """Loss and accuracy per epoch. Loggers write train and val metrics on separate rows, so
    values are grouped by epoch and NaNs dropped per series rather than per row."""
    h = _read_history(history_csv_or_rows)
    fig = Figure(figsize=(10.0, 4.0))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for stage, style in (("train", "-o"), ("val", "--s")):
            epochs, values = _per_epoch(h["epoch"], h[f"{stage}_{metric}"])
            if values.size:
                ax.plot(epochs, values, style, ms=3, label=stage)
        ax.set(xlabel="Epoch", ylabel=metric.capitalize(), title=metric.capitalize())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            _no_curve(ax, "not logged")
    fig.suptitle("Training history")
    return save_figure(fig, path)


def _per_epoch(epochs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One value per epoch (the last logged), ignoring rows where this series is missing."""
    keep = np.isfinite(epochs) & np.isfinite(values)
    last: dict[float, float] = {}
    for e, v in zip(epochs[keep], values[keep]):
        last[float(e)] = float(v)
    xs = np.array(sorted(last))
    return xs, np.array([last[x] for x in xs])


def reliability_diagram(
    y_true: Iterable[int],
    prob: Iterable[float],
    path: str | os.PathLike[str],
    n_bins: int = 15,
) -> Path:
    """A threshold picked on a miscalibrated model means something else on new data; this shows how far off it is.

    Bins and ECE come from ``pneumoscan.core.metrics`` so the figure agrees with the number in the report.
    """
    from pneumoscan.core.metrics import expected_calibration_error, reliability_curve

    y, p = _arrays(y_true, prob)
    mean_p, observed, _ = reliability_curve(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts, _ = np.histogram(p, bins=edges)  # same [lo, hi) bins as metrics, empty ones included

    fig = Figure(figsize=(5.0, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfectly calibrated")
    top.plot(mean_p, observed, "-o", ms=4, label="model")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel=f"Observed fraction {CLASS_NAMES[1]}",
            title=f"Reliability diagram (ECE = {ece:.3f})")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)

    bottom.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:gray", edgecolor="white")
    bottom.set(xlabel=f"Predicted P({CLASS_NAMES[1]})", ylabel="Images")
    bottom.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def class_counts_bar(counts: Mapping[str, Mapping[str, int]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars, splits on the x-axis and one bar per class, so imbalance is visible per split."""
    splits = list(counts)
    classes = list(CLASS_NAMES) + sorted({c for s in counts.values() for c in s} - set(CLASS_NAMES))
    x = np.arange(len(splits))
    width = 0.8 / max(len(classes), 1)
    fig = Figure(figsize=(max(4.5, 1.6 * len(splits) + 2), 4.0))
    ax = fig.add_subplot()
    for i, name in enumerate(classes):
        values = [counts[s].get(name, 0) for s in splits]
        color = CLASS_COLORS[i] if i < len(CLASS_COLORS) else None
        bars = ax.bar(x + (i - (len(classes) - 1) / 2) * width, values, width, label=name, color=color)
        ax.bar_label(bars, fontsize="small", padding=2)
    ax.set_xticks(x, labels=splits)
    ax.set(xlabel="Split", ylabel="Images", title="Images per split and class")
    ax.margins(y=0.12)
    ax.legend(title="class")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _shorten(text: str, limit: int = 22) -> str:
    """Keep both ends of a long caption: file names differ at the end, datasets at the start."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def sample_grid(
    images_by_class: Mapping[str, Sequence[np.ndarray]],
    path: str | os.PathLike[str],
    titles: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """One row per class. ``titles`` optionally captions each image (e.g. file name or score)."""
    names = [n for n in images_by_class if len(images_by_class[n])] or list(images_by_class)
    n_cols = max((len(images_by_class[n]) for n in names), default=0) or 1
    n_rows = max(len(names), 1)
    fig = Figure(figsize=(1.9 * n_cols, 2.0 * n_rows + 0.4))
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, name in enumerate(names):
        images = images_by_class[name]
        captions = (titles or {}).get(name, ())
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(np.asarray(images[c]), cmap="gray", vmin=0, vmax=255)
                if c < len(captions):
                    ax.set_title(_shorten(str(captions[c])), fontsize="x-small")
            if c == 0:
                ax.set_ylabel(name, fontsize="medium")
    fig.suptitle("Sample images")
    return save_figure(fig, path)
