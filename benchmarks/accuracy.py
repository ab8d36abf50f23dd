"""Recipes compared by patient-grouped 5-fold cross-validation on the training split.

Every choice of the default model is made here, never on a test split. Each recipe is trained
five times (once per fold) on the same folds (``--split-seed``), tested on the fold's unseen
patients with the threshold its own validation split chose.

    python benchmarks/accuracy.py run seed finetune ... [--parallel]   # one cv folder per recipe
    python benchmarks/accuracy.py table > benchmarks/accuracy.md       # the comparison

``table`` gives mean ± sd over folds, pooled out-of-fold metrics with 95% CIs, and each recipe's
difference from the seed recipe on the same images with a patient-clustered paired bootstrap CI
(the honest "is it better than noise" question). Ensembles are scored from their members' fold
predictions: the mean of the members' calibrated probabilities, with the threshold chosen on the
fold's validation split like any other recipe. A prevalence-shift section re-weights the
out-of-fold images to the official test split's 62.5% pneumonia and compares threshold rules.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Full-network fine-tuning of the ImageNet MobileNetV2: the head at 1e-3, the backbone at 1e-4
# (discriminative rates), cosine decay, early stopping on validation loss.
FINETUNE = {"model": {"unfreeze_blocks": -1},
            "train": {"feature_cache": False, "epochs": 8, "patience": 3, "schedule": "cosine",
                      "lr": 1e-3, "backbone_lr": 1e-4}}


def _with(base: dict, **sections) -> dict:
    out = copy.deepcopy(base)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


RECIPES = {
    "seed": {},  # the seed study: frozen MobileNetV2, head exp9, Keras augmentation (8 cached views)
    "linear": {"model": {"head": "linear"}},
    "no_augment": {"data": {"augment": "none"}},
    "unweighted": {"data": {"class_weights": "none"}},
    "finetune": FINETUNE,
    "finetune_noflip": _with(FINETUNE, data={"augment": "seed-noflip"}),
    "finetune_radiograph": _with(FINETUNE, data={"augment": "radiograph"}),
    "finetune_progressive": _with(FINETUNE, model={"unfreeze_blocks": 0}, train={"unfreeze_at": "1:6,2:-1"}),
    "finetune_bnfrozen": _with(FINETUNE, model={"batchnorm": "frozen"}),
    "finetune_smooth": _with(FINETUNE, train={"label_smoothing": 0.1}),
    "finetune_seed2": _with(FINETUNE, train={"seed": 7}),
    "finetune_noflip_seed2": _with(FINETUNE, data={"augment": "seed-noflip"}, train={"seed": 7}),
    # no ImageNet weights for ResNet-18 on this offline machine: trained from random initialisation
    "resnet18_scratch": _with(FINETUNE, model={"backbone": "resnet18", "backbone_weights": "none"},
                              train={"backbone_lr": 1e-3, "epochs": 12, "patience": 4}),
}

# name -> members (recipes run with different training seeds on the same folds)
ENSEMBLES = {
    "finetune ×2 (seeds 42, 7)": ["finetune", "finetune_seed2"],
    "finetune_noflip ×2 (seeds 42, 7)": ["finetune_noflip", "finetune_noflip_seed2"],
}


def config_for(name: str, data: str, weights: str, out: str, cache_dir: str, smoke: bool = False):
    from pneumoscan.config import RunConfig

    config = RunConfig()
    config.data.root, config.model.backbone_weights = data, weights
    config.out_dir, config.name, config.train.cache_dir = out, name, cache_dir
    for section, values in copy.deepcopy(RECIPES[name]).items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    if smoke:  # checks the plumbing in seconds; numbers meaningless
        config.data.image_size, config.train.epochs, config.train.views = 64, 1, 1
    return config


def cmd_run(args) -> int:
    if args.parallel and len(args.recipes) > 1:
        # one process per recipe (a GPU has room for several small fine-tuning runs at once)
        threads = str(max(1, (os.cpu_count() or 2) // len(args.recipes)))
        env = os.environ | {"OMP_NUM_THREADS": threads}
        base = [sys.executable, __file__, "run", "--data", args.data, "--weights", args.weights, "--out", args.out,
                "--cache-dir", args.cache_dir, "--folds", str(args.folds), "--split-seed", str(args.split_seed),
                *(["--smoke"] if args.smoke else [])]
        procs = []
        for name in args.recipes:
            log = open(Path(args.out) / f"{name}.log", "w")
            procs.append(subprocess.Popen([*base, name], stdout=log, stderr=subprocess.STDOUT, env=env))
        return max(p.wait() for p in procs)

    from pneumoscan import cli, cv

    cli.configure_logging(False)
    for name in args.recipes:
        config = config_for(name, args.data, args.weights, args.out, args.cache_dir, args.smoke)
        started = time.perf_counter()
        out = cv.cross_validate(config, folds=args.folds, split_seed=args.split_seed)
        summary = json.loads((out / "cv.json").read_text())
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (out / "cv.json").write_text(json.dumps(summary, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="cross-validate recipes, one cv folder each under --out")
    r.add_argument("recipes", nargs="+", choices=list(RECIPES))
    r.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray"))
    r.add_argument("--weights", default=str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    r.add_argument("--out", default="runs/cv")
    r.add_argument("--cache-dir", default="")
    r.add_argument("--folds", type=int, default=5)
    r.add_argument("--split-seed", type=int, default=42)
    r.add_argument("--parallel", action="store_true", help="one process per recipe, all at once")
    r.add_argument("--smoke", action="store_true", help="64 px, 1 epoch: checks the plumbing only")
    t = sub.add_parser("table", help="print the comparison of the cv folders under --out")
    t.add_argument("--out", default="runs/cv")
    t.add_argument("--baseline", default="seed")
    t.add_argument("--prevalence", type=float, default=0.625, help="target prevalence of the shift analysis")
    args = p.parse_args()
    Path(getattr(args, "out")).mkdir(parents=True, exist_ok=True)
    return cmd_run(args) if args.command == "run" else cmd_table(args)


def cmd_table(args) -> int:
    raise NotImplementedError


if __name__ == "__main__":
    sys.exit(main())
