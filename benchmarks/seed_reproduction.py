"""Reproduce the seed study on the full training split, with an honest hold-out.

Trains the seed-study recipe (frozen ImageNet MobileNetV2 + the study's head, seed
augmentation, balanced class weights) on ../shared/data/chest_xray/train minus a patient-grouped
~15% hold-out, which serves as the test set (the official test split is held back). Prints the
hold-out metrics with 95% CIs, the wall time and the time per epoch.

    python benchmarks/seed_reproduction.py [--data ../shared/data/chest_xray/train] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan.cli import console
from pneumoscan.io import data
from pneumoscan.training import train
from pneumoscan.core.config import apply_overrides
from pneumoscan.core.recipes import recipe

ROOT = Path(__file__).resolve().parents[1]


def holdout_tree(source: Path, dest: Path, fraction: float, seed: int) -> Path:
    """A split root of symlinks: train/ and a patient-grouped test/ carved from the source folder."""
    samples = data.holdout_split(data.scan(source, default_split="train"), fraction, seed)
    for s in samples:
        link = dest / s.split / ("NORMAL", "PNEUMONIA")[s.label] / Path(s.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(s.path).resolve())
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray/train"))
    p.add_argument("--weights", default=str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default="seed-reproduction")
    p.add_argument("--holdout", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slow", action="store_true", help="run the backbone every batch (no feature cache)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config overrides, e.g. --set train.lr=3e-4 data.augment=seed-noflip (repeatable)")
    args = p.parse_args()
    console.configure_logging(False)

    with tempfile.TemporaryDirectory() as tmp:
        root = holdout_tree(Path(args.data), Path(tmp) / "chest_xray", args.holdout, args.seed)
        config = apply_overrides(recipe("seed-study"), {
            "data.root": str(root), "model.backbone_weights": args.weights, "train.seed": args.seed,
            "train.feature_cache": not args.slow, "out_dir": args.out, "name": args.name})
        config = apply_overrides(config, args.set)
        started = time.perf_counter()
        run = train.fit(config)
        wall = time.perf_counter() - started

    test = json.loads((run / "test" / "metrics.json").read_text())
    meta_training = json.loads((run / "validation" / "metrics.json").read_text())
    import torch

    blob = torch.load(run / "model.pt", weights_only=True)["meta"]["training"]
    print(f"\n## Seed study reproduction ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__})\n")
    print(f"data: {args.data}, patient-grouped hold-out {args.holdout:.0%} (seed {args.seed}) as test: "
          f"n={test['n']}; threshold {test['threshold']:.3f} chosen on validation (n={meta_training['n']})\n")
    print("| metric | hold-out | 95% CI |\n| --- | --- | --- |")
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        lo, hi = test["ci95"][key]
        print(f"| {key} | {test[key]:.3f} | [{lo:.3f}, {hi:.3f}] |")
    print(f"\nwall time (decode + features + training + calibration + evaluation): {wall:.0f} s; "
          f"feature extraction {blob['feature_seconds']:.0f} s; "
          f"training {blob['seconds']:.0f} s for {blob['epochs_run']} epochs "
          f"({blob['seconds_per_epoch']:.2f} s/epoch), best epoch {blob['best_epoch']}")
    print(f"run folder: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
