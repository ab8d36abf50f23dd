"""Running a model over images and writing honest metrics: JSON with CIs, predictions, plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pneumoscan import CLASS_NAMES, artifact, data, metrics, plots
from pneumoscan.files import write_csv, write_json
from pneumoscan.errors import UserError

log = logging.getLogger(__name__)


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], the input every Classifier expects."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = [model(as_batch(images[i:i + batch_size])).float() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate_predictions(y_true: np.ndarray, prob: np.ndarray, threshold: float, out_dir: str | Path,
                         paths: Sequence[str], *, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Write metrics.json, predictions.csv and the plots for one set of predictions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = metrics.binary_metrics(y_true, prob, threshold)
    result["ci95"] = metrics.bootstrap_ci(y_true, prob, threshold, n_resamples=n_bootstrap, seed=seed)
    write_json(out / "metrics.json", result)
    pred = (prob >= threshold).astype(int)
    write_csv(out / "predictions.csv", ["path", "label", "probability", "prediction"],
              [(p, int(t), f"{q:.6f}", int(k)) for p, t, q, k in zip(paths, y_true, prob, pred)])
    plots.confusion_matrix_plot(result["confusion_matrix"], out / "confusion_matrix.png")
    if len(set(y_true.tolist())) == 2:
        plots.roc_plot(y_true, prob, out / "roc.png", threshold=threshold)
        plots.pr_plot(y_true, prob, out / "pr.png", threshold=threshold)
    plots.probability_histogram(y_true, prob, out / "probability_histogram.png", threshold=threshold)
    return result


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


def run(model_path: str | Path, data_root: str | Path, out_dir: str | Path, *, threshold: float | None = None,
        split: str | None = None, strict: bool = False, n_bootstrap: int = 2000,
        decode_progress: Callable[[int], None] | None = None) -> dict:
    model, meta = artifact.load(model_path)
    samples = select_split(data.scan(data_root, default_split="test"), split)
    kept, images, skipped = data.load_images(samples, meta["image_size"], strict=strict, progress=decode_progress)
    out = Path(out_dir)
    if skipped:
        data.write_skipped(skipped, out / "skipped.csv")
    prob = metrics.sigmoid(predict_logits(model, images))
    y = np.array([s.label for s in kept])
    thr = meta["threshold"] if threshold is None else float(threshold)
    result = evaluate_predictions(y, prob, thr, out, [s.path for s in kept], n_bootstrap=n_bootstrap)
    write_json(out / "evaluation.json", {
        "model": str(model_path),
        "data": str(data_root),
        "split": split or sorted({s.split for s in kept}),
        "n_images": len(kept),
        "n_skipped": len(skipped),
        "threshold": thr,
        "threshold_source": "--threshold" if threshold is not None else f"model ({meta['threshold_rule']} on validation)",
        "class_names": list(CLASS_NAMES),
    })
    log.info("evaluated %d images from %s: %s", len(kept), data_root, summary_line(result))
    return result


def summary_line(result: dict) -> str:
    ci = result.get("ci95", {})

    def fmt(key: str) -> str:
        lo, hi = ci.get(key, (float("nan"), float("nan")))
        return f"{key} {result[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    keys = ("accuracy", "roc_auc", "recall", "specificity")
    return f"n={result['n']}, threshold {result['threshold']:.3f}: " + ", ".join(fmt(k) for k in keys)
