"""Training speed: slow path vs fast path vs fine-tuning, measured in one run on this machine.

All three train the seed-study recipe (frozen ImageNet MobileNetV2; ``--recipe seed-study``) on the
same patient-grouped split of
../shared/data/chest_xray/train (the 15% hold-out is the test set):

- fast path: frozen backbone, head trained on cached features of K augmented views (the default);
- slow path: frozen backbone run on every batch (what the seed study's Keras code does);
- fine-tuning: the last 3 MobileNetV2 stages unfrozen (cannot use cached features).

The fast path runs to early stopping. The slow path and fine-tuning run ``--epochs-slow`` epochs
(default 2) and their time to the best checkpoint is projected as seconds/epoch × the fast path's
best epoch — printed as a projection, not a measurement. Ratios are against the slow path.

    python benchmarks/training.py [--epochs-slow 2]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_reproduction import ROOT, holdout_tree  # noqa: E402

from pneumoscan.modeling import artifact
from pneumoscan.cli import console
from pneumoscan.training import train  # noqa: E402
from pneumoscan.core.config import apply_overrides  # noqa: E402
from pneumoscan.core.recipes import recipe  # noqa: E402


def run(root: Path, out: str, name: str, weights: str, *overrides: str) -> dict:
    """Train the seed-study recipe with ``overrides`` ("section.field=value", config.apply_overrides)."""
    config = apply_overrides(recipe("seed-study"), [f"data.root={root}", f"model.backbone_weights={weights}",
                                                    f"out_dir={out}", f"name={name}", *overrides])
    started = time.perf_counter()
    run_dir = train.fit(config)
    wall = time.perf_counter() - started
    meta = artifact.read_meta(run_dir / "model.pt").to_dict()["training"]
    test = json.loads((run_dir / "test" / "metrics.json").read_text())
    return {"name": name, "wall": wall, **meta, "roc_auc": test["roc_auc"], "accuracy": test["accuracy"],
            "images_per_s": meta["n_train"] * meta["epochs_run"] / max(meta["seconds"], 1e-9)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray/train"))
    p.add_argument("--weights", default=str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--out", default="runs/bench-training")
    p.add_argument("--epochs-slow", type=int, default=2)
    args = p.parse_args()
    console.configure_logging(False)
    with tempfile.TemporaryDirectory() as tmp:
        root = holdout_tree(Path(args.data), Path(tmp) / "chest_xray", 0.15, 42)
        fast = run(root, args.out, "fast", args.weights, f"train.cache_dir={Path(tmp) / 'cache'}")
        slow = run(root, args.out, "slow", args.weights, "train.feature_cache=false",
                   f"train.epochs={args.epochs_slow}")
        tune = run(root, args.out, "finetune", args.weights, "model.unfreeze_blocks=3",
                   f"train.epochs={args.epochs_slow}")

    best = fast["best_epoch"] or fast["epochs_run"]
    print(f"\n## Training speed ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()})\n")
    print("| path | epochs run | s/epoch | feature cache s | time to best checkpoint | vs slow path | "
          "train img/s | hold-out ROC-AUC | hold-out accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    slow_to_best = slow["seconds_per_epoch"] * best
    for r, to_best, note in (
        (fast, fast["feature_seconds"] + fast["seconds_per_epoch"] * best, "measured"),
        (slow, slow_to_best, f"projected ({best} epochs)"),
        (tune, tune["seconds_per_epoch"] * best, f"projected ({best} epochs)"),
    ):
        print(f"| {r['name']} | {r['epochs_run']} | {r['seconds_per_epoch']:.1f} | {r['feature_seconds']:.0f} | "
              f"{to_best:.0f} s {note} | {slow_to_best / to_best:.1f}× | {r['images_per_s']:.0f} | "
              f"{r['roc_auc']:.3f} | {r['accuracy']:.3f} |")
    print("\n(slow path and fine-tuning ran only", args.epochs_slow, "epochs: their hold-out metrics are not "
          "comparable to the fast path's.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
