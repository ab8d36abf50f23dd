"""Patient-grouped, stratified k-fold cross-validation on the training data.

The way to tell a real gain from noise before anyone looks at a test set: every recipe is trained
k times, each fold's model is tested on patients it never saw, with its threshold and temperature
chosen on its own validation split. A dataset's own test split is never used here.

The folds are pooled from the typed evaluations each fold's training returns in memory
(``RunResult``); only a fold finished by an earlier, interrupted run is read back from its files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import yaml

from pneumoscan.io import data
from pneumoscan.training import ensemble, loaders, train
from pneumoscan.core import metrics
from pneumoscan.core.config import RunConfig, member_names
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import write_csv, write_json, write_text
from pneumoscan.evaluation.results import Evaluation, Predictions
from pneumoscan.training.results import RunResult

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("roc_auc", "accuracy", "recall", "specificity", "precision", "f1", "pr_auc", "brier")


def fold_samples(pool: list[data.Sample], folds: int, seed: int, val_fraction: float) -> list[list[data.Sample]]:
    """For each fold: its held-out patients as 'test', the rest split into train and a grouped val."""
    out = []
    for train_idx, test_idx in data.grouped_folds(pool, folds, seed):
        rest = [dataclasses.replace(pool[i], split="train") for i in train_idx]
        held = [dataclasses.replace(pool[i], split="test") for i in test_idx]
        out.append(data.assign_validation(rest, val_fraction=val_fraction, min_val_images=10**9, seed=seed) + held)
    return out


def cross_validate(config: RunConfig, folds: int = 5, progress: loaders.Progress | None = None,
                   split_seed: int = 42) -> Path:
    """``split_seed`` fixes the folds apart from the training seed, so recipes (and seeds of one
    recipe, for an ensemble) are compared on exactly the same patients. Run again with the same
    name, an interrupted cross-validation keeps its finished folds and trains only the rest.
    An ensemble recipe (``train.members``, the default) trains every member on each fold's split and
    scores the fold with their ensemble, as ``pneumoscan train`` would."""
    pool = [dataclasses.replace(s, split="train")
            for s in data.scan(config.data.root) if s.split in ("train", "val")]
    if not pool:
        raise UserError(f"no training images under {config.data.root}")
    out = Path(config.out_dir) / (config.name or f"cv-{train.default_run_name(config)}")
    cache = config.train.cache_dir or str(Path(config.out_dir) / ".feature-cache")
    # decoded once for all folds
    pool, images, skipped = data.load_images(
        pool, config.data.image_size, strict=config.data.strict,
        progress=(lambda k: progress("decoding images", k, len(pool))) if progress else None)
    index = {s.path: i for i, s in enumerate(pool)}
    rows, oof = [], []
    member_oof: dict[str, list] = {name: [] for name in member_names(config.train.members)}
    for k, samples in enumerate(fold_samples(pool, folds, split_seed, config.data.val_fraction), start=1):
        cfg = copy.deepcopy(config)
        cfg.out_dir, cfg.name, cfg.train.cache_dir = str(out), f"fold{k}", cache
        cfg.train.ood = False  # a fold model only scores its held-out fold: its detector would go unused
        run = out / f"fold{k}"
        if _fold_done(run, samples, cfg):
            log.info("fold %d/%d: done earlier, reusing %s", k, folds, run)
            result = RunResult.load(run, members=list(member_oof))
        else:
            log.info("fold %d/%d", k, folds)
            if run.exists():  # an interrupted fold starts again from scratch
                shutil.rmtree(run)
            fold_images = images[np.array([index[s.path] for s in samples])]
            result = ensemble.fit(cfg, samples=samples, images=fold_images, progress=progress, report=False)
        test = result.test
        rows.append({"fold": k} | {key: test.value(key) for key in SUMMARY_KEYS}
                    | {"threshold": test.threshold, "n": test.n})
        oof += _out_of_fold(test.predictions, k)
        for name in member_oof:
            member_oof[name] += _out_of_fold(result.members[name].test.predictions, k)

    summary = {
        "folds": folds, "split_seed": split_seed, "n_images": len(pool), "n_skipped": len(skipped),
        "config": config.to_dict(),
        "mean": {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_KEYS},
        "sd": {k: float(np.nanstd([r[k] for r in rows], ddof=1)) for k in SUMMARY_KEYS},
        "per_fold": rows, "pooled_out_of_fold": pooled_metrics(oof),
    }
    if member_oof:  # does the ensemble beat its members on these patients?
        summary["members_pooled_out_of_fold"] = {name: pooled_metrics(p) for name, p in member_oof.items()}
    write_json(out / "cv.json", summary)
    data.write_skipped(skipped, out / "skipped.csv")
    write_csv(out / "oof_predictions.csv", ["path", "label", "probability", "prediction", "fold"], oof)
    write_text(out / "cv.md", markdown(summary))
    log.info("cross-validation: %s", out / "cv.md")
    return out


def _out_of_fold(predictions: Predictions, fold: int) -> list[tuple]:
    """oof_predictions.csv's rows of one fold: path, label, probability, prediction, fold."""
    return [(p, int(t), float(q), int(k), fold) for p, t, q, k in
            zip(predictions.paths, predictions.label, predictions.probability, predictions.prediction)]


def pooled_metrics(oof: list[tuple]) -> dict:
    """Pooled out-of-fold metrics: each image judged by its own fold's model and threshold."""
    y = np.array([r[1] for r in oof])
    prob = np.array([r[2] for r in oof])
    pred = np.array([r[3] for r in oof])
    pooled = metrics.binary_metrics(y, prob, 0.5) | _thresholded(y, pred)
    pooled.pop("threshold")
    pooled["brier"] = metrics.brier(y, prob)
    ci = metrics.bootstrap_ci(y, prob, 0.5, n_resamples=2000, seed=0)
    pooled["ci95"] = {k: ci[k] for k in ("roc_auc", "pr_auc")}
    return pooled


def _fold_done(run: Path, samples: list[data.Sample], config: RunConfig) -> bool:
    """A fold finished by an earlier, interrupted cross-validation of the same recipe and folds."""
    members = member_names(config.train.members)
    # an ensemble's own manifest lists only what it was calibrated on; its members' list the split
    manifest = run / "members" / members[0] / "manifest.csv" if members else run / "manifest.csv"
    if not (Evaluation.saved_in(run / "test") and manifest.is_file() and (run / "config.yaml").is_file()):
        return False
    earlier, now = yaml.safe_load((run / "config.yaml").read_text()), config.to_dict()
    if (earlier.get("model"), earlier.get("data"), (earlier.get("train") or {}).get("members")) != (
            now["model"], now["data"], now["train"]["members"]):
        return False
    earlier = {(s.path, s.split) for s in data.read_manifest(manifest)}
    return earlier == {(s.path, s.split) for s in samples}


def _thresholded(y: np.ndarray, pred: np.ndarray) -> dict:
    (tn, fp), (fn, tp) = metrics.confusion(y, pred)
    safe = lambda a, b: float(a / b) if b else 0.0  # noqa: E731
    precision, recall = safe(tp, tp + fp), safe(tp, tp + fn)
    return {"accuracy": safe(tp + tn, len(y)), "precision": precision, "recall": recall,
            "specificity": safe(tn, tn + fp), "f1": safe(2 * precision * recall, precision + recall),
            "confusion_matrix": [[tn, fp], [fn, tp]]}


def markdown(summary: dict) -> str:
    lines = [f"# {summary['folds']}-fold patient-grouped cross-validation ({summary['n_images']} images)", "",
             ("Each fold's temperature was fitted on that fold's own validation split, and so was its threshold "
              "when the rule is fitted (youden, sensitivity:X); a fixed rule such as 0.5 is the same in every fold. "
              "The held-out patients come from the same collection as the training films, so these numbers are an "
              "upper bound for another hospital's films (`pneumoscan robustness` measures acquisition shifts)."), "",
             "| metric | mean ± sd over folds | pooled out-of-fold |", "| --- | --- | --- |"]
    pooled = summary["pooled_out_of_fold"]
    for k in SUMMARY_KEYS:
        extra = ""
        if k in pooled.get("ci95", {}):
            lo, hi = pooled["ci95"][k]
            extra = f" [{lo:.3f}, {hi:.3f}]"
        lines.append(f"| {k} | {summary['mean'][k]:.3f} ± {summary['sd'][k]:.3f} | {pooled[k]:.3f}{extra} |")
    members = summary.get("members_pooled_out_of_fold")
    if members:
        keys = ("roc_auc", "accuracy", "recall", "specificity", "brier")
        lines += ["", ("The ensemble and each of its members, trained on the same folds (pooled out-of-fold, each "
                       "at its own fold's threshold; ROC-AUC with its 95% CI):"), "",
                  "| model | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for name, m in [("ensemble", pooled), *members.items()]:
            lo, hi = m["ci95"]["roc_auc"]
            cells = [f"{m['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}]", *(f"{m[k]:.3f}" for k in keys[1:])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
