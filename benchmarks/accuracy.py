"""Recipes compared by patient-grouped 5-fold cross-validation on the training split.

Every choice of the default model is made here, never on a test split. Each recipe is trained
five times (once per fold), tested on the fold's unseen patients with the threshold its own
validation split chose; the table gives mean ± sd over folds and the pooled out-of-fold ROC-AUC
with its 95% CI. Recipes that differ only in the head share one feature store, so the whole table
costs little more than one feature extraction.

    python benchmarks/accuracy.py [--recipes default linear no_augment unweighted] > benchmarks/accuracy.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from pneumoscan import cli, cv
from pneumoscan.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "default": {},  # the seed study's recipe: frozen MobileNetV2, head exp9, seed augmentation, 8 views
    "linear": {"model": {"head": "linear"}},
    "exp6_dense64": {"model": {"head": "exp6"}},
    "no_augment": {"data": {"augment": "none"}},
    "unweighted": {"data": {"class_weights": "none"}},
    "sensitivity95": {"train": {"threshold": "sensitivity:0.95"}},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray"))
    p.add_argument("--weights", default=str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--out", default="runs/cv")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = p.parse_args()
    cli.configure_logging(False)

    rows = []
    for name in args.recipes:
        config = RunConfig()
        config.data.root, config.model.backbone_weights = args.data, args.weights
        config.out_dir, config.name, config.train.cache_dir = args.out, name, args.cache_dir
        for section, values in copy.deepcopy(RECIPES[name]).items():
            for key, value in values.items():
                setattr(getattr(config, section), key, value)
        started = time.perf_counter()
        out = cv.cross_validate(config, folds=args.folds)
        summary = json.loads((out / "cv.json").read_text())
        rows.append((name, summary, time.perf_counter() - started))

    print(f"## Recipes by {args.folds}-fold patient-grouped cross-validation ({args.data})\n")
    print("| recipe | ROC-AUC | accuracy | recall | specificity | F1 | pooled OOF ROC-AUC [95% CI] | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s, seconds in sorted(rows, key=lambda r: -r[1]["mean"]["roc_auc"]):
        m, sd, pooled = s["mean"], s["sd"], s["pooled_out_of_fold"]
        lo, hi = pooled["ci95"]["roc_auc"]
        cells = " | ".join(f"{m[k]:.3f} ± {sd[k]:.3f}" for k in ("roc_auc", "accuracy", "recall", "specificity", "f1"))
        print(f"| {name} | {cells} | {pooled['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}] | {seconds / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
