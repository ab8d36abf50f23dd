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
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pneumoscan.core.recipes import RECIPES as config_recipes
from pneumoscan.core.config import RunConfig, apply_overrides, merge

ROOT = Path(__file__).resolve().parents[1]

def _with(base: dict, **sections) -> dict:
    return merge(base, sections)


# The seed study as the package defines it (`pneumoscan train --recipe seed-study`).
SEED = config_recipes["seed-study"]

# Full-network fine-tuning of the ImageNet MobileNetV2: the head at 1e-3, the backbone at 1e-4
# (discriminative rates), cosine decay, early stopping on validation loss.
FINETUNE = _with(SEED, model={"unfreeze_blocks": -1},
                 train={"feature_cache": False, "epochs": 8, "patience": 3, "schedule": "cosine",
                        "lr": 1e-3, "backbone_lr": 1e-4})

RECIPES = {
    "seed": SEED,  # frozen MobileNetV2 + head exp9, Keras augmentation (8 cached views), Adam 1e-3
    "linear": _with(SEED, model={"head": "linear"}),
    "no_augment": _with(SEED, data={"augment": "none"}),
    "unweighted": _with(SEED, data={"class_weights": "none"}),
    "finetune": FINETUNE,
    "finetune_noflip": _with(FINETUNE, data={"augment": "seed-noflip"}),
    # the package default, which then cuts at 0.5 instead (see RETHRESHOLDED)
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


# name -> (recipe, threshold rule): the recipe's fold models with another rule on the same validation
RETHRESHOLDED = {"finetune_radiograph, threshold 0.5 (the default)": ("finetune_radiograph", "0.5")}
THRESHOLD_RULES = ("youden", "0.5", "sensitivity:0.95")


# checks the plumbing in seconds; numbers meaningless
SMOKE = {"data.image_size": 64, "train.epochs": 1, "train.views": 1}


def config_for(name: str, data: str, weights: str, out: str, cache_dir: str, smoke: bool = False) -> RunConfig:
    """Recipe ``name`` on this machine's data and weights (config.apply_overrides, validated)."""
    config = RunConfig.from_dict(merge(RunConfig().to_dict(), RECIPES[name]))
    return apply_overrides(config, {"data.root": data, "model.backbone_weights": weights, "out_dir": out,
                                    "name": name, "train.cache_dir": cache_dir, **(SMOKE if smoke else {})})


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

    from pneumoscan.cli import console
    from pneumoscan.training import cv

    console.configure_logging(False)
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
    t.add_argument("--out", nargs="+", default=["runs/cv"], help="folders holding cv folders; later ones win")
    t.add_argument("--baseline", default="seed")
    t.add_argument("--shift", nargs="*", default=["seed", "finetune_radiograph"],
                   help="recipes of the prevalence-shift table")
    t.add_argument("--prevalence", type=float, default=0.625, help="target prevalence of the shift analysis")
    args = p.parse_args()
    if args.command == "run":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return cmd_run(args)
    return cmd_table(args)


def _key(path: str) -> str:
    """train/CLASS/file: the same image whatever folder the data sat in on the machine that ran it."""
    return "/".join(Path(path).parts[-3:])


def _read_predictions(path: Path) -> dict[str, tuple[int, float, int]]:
    with open(path, newline="") as f:
        return {_key(r["path"]): (int(r["label"]), float(r["probability"]), int(r["prediction"]))
                for r in csv.DictReader(f)}


def load_recipe(folder: Path) -> dict | None:
    """Each finished fold's validation and test predictions (cv.json is not needed: a cut-short
    cross-validation still shows what its finished folds measured)."""
    folds = []
    for k in range(1, 100):
        fold = folder / f"fold{k}"
        if not fold.is_dir():
            break
        if (fold / "test" / "predictions.csv").is_file():
            folds.append({"val": _read_predictions(fold / "validation" / "predictions.csv"),
                          "test": _read_predictions(fold / "test" / "predictions.csv"),
                          "metrics": json.loads((fold / "test" / "metrics.json").read_text())})
    if not folds:
        return None
    summary = json.loads((folder / "cv.json").read_text()) if (folder / "cv.json").is_file() else {}
    return {"name": folder.name, "folds": folds, "n_folds": summary.get("folds", 5)}


def ensemble(members: list[dict], name: str) -> dict:
    """Mean of the members' calibrated probabilities; threshold by Youden on each fold's validation."""
    from pneumoscan.core import calibration, metrics

    folds = []
    for parts in zip(*(m["folds"] for m in members)):
        out = {}
        for split in ("val", "test"):
            keys = sorted(parts[0][split])
            y = np.array([parts[0][split][k][0] for k in keys])
            prob = np.mean([[part[split][k][1] for k in keys] for part in parts], axis=0)
            out[split] = (keys, y, prob)
        threshold = calibration.choose_threshold(out["val"][1], out["val"][2], "youden")
        keys, y, prob = out["test"]
        pred = (prob >= threshold).astype(int)
        folds.append({"test": {k: (int(a), float(b), int(c)) for k, a, b, c in zip(keys, y, prob, pred)},
                      "val": {k: (int(a), float(b), int(b >= threshold)) for k, a, b in zip(*out["val"])},
                      "metrics": metrics.binary_metrics(y, prob, threshold)})
    return {"name": name, "folds": folds, "n_folds": members[0]["n_folds"]}


def rethreshold(recipe: dict, rule: str, name: str) -> dict:
    from pneumoscan.core import calibration, metrics

    folds = []
    for fold in recipe["folds"]:
        vy, vp = (np.array([v[i] for v in fold["val"].values()]) for i in (0, 1))
        threshold = calibration.choose_threshold(vy, vp, rule)
        test = {k: (y, p, int(p >= threshold)) for k, (y, p, _) in fold["test"].items()}
        ty, tp = (np.array([v[i] for v in test.values()]) for i in (0, 1))
        folds.append({"val": fold["val"], "test": test, "metrics": metrics.binary_metrics(ty, tp, threshold)})
    return {"name": name, "folds": folds, "n_folds": recipe["n_folds"]}


def prior_corrected(recipe: dict, target: float) -> dict:
    """Every test logit shifted by log-odds(target) - log-odds(training prevalence), cut at 0.5.
    The validation split is stratified, so its prevalence is the training prevalence."""
    from pneumoscan.core import metrics

    log_odds = lambda p: np.log(p / (1 - p))  # noqa: E731
    folds = []
    for fold in recipe["folds"]:
        shift = log_odds(target) - log_odds(np.mean([v[0] for v in fold["val"].values()]))
        test = {}
        for k, (y, p, _) in fold["test"].items():
            q = float(metrics.sigmoid(log_odds(np.clip(p, 1e-7, 1 - 1e-7)) + shift))
            test[k] = (y, q, int(q >= 0.5))
        folds.append({"val": fold["val"], "test": test})
    return {"name": recipe["name"], "folds": folds, "n_folds": recipe["n_folds"]}


def pooled(recipe: dict) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    rows = {k: v for fold in recipe["folds"] for k, v in fold["test"].items()}
    keys = sorted(rows)
    y, prob, pred = (np.array([rows[k][i] for k in keys]) for i in range(3))
    return keys, y, prob, pred


def compare(base: dict, other: dict) -> dict:
    """Paired, patient-clustered bootstrap of other - base on the images both have predictions for."""
    from pneumoscan.io import data
    from pneumoscan.core import metrics

    kb, yb, pb, db = pooled(base)
    ko, _, po, do = pooled(other)
    common = sorted(set(kb) & set(ko))
    ib, io = {k: i for i, k in enumerate(kb)}, {k: i for i, k in enumerate(ko)}
    sb, so = [ib[k] for k in common], [io[k] for k in common]
    y, groups = yb[sb], [data.patient_id(k) for k in common]
    auc = metrics.paired_bootstrap_diff(y, pb[sb], po[so], groups)
    thresholded = metrics.paired_bootstrap_diff(y, db[sb], do[so], groups)
    return {"n": len(common), "roc_auc": auc["roc_auc"], **{k: thresholded[k] for k in
                                                             ("accuracy", "recall", "specificity")}}


def cmd_table(args) -> int:
    from pneumoscan.core import metrics

    recipes: dict[str, dict] = {}
    for out in args.out:  # later folders win: a re-run replaces a recipe
        for folder in sorted(Path(out).iterdir()):
            if folder.is_dir() and (loaded := load_recipe(folder)):
                recipes[folder.name] = loaded
    for name, members in ENSEMBLES.items():
        if all(m in recipes for m in members):  # on the folds all members finished
            recipes[name] = ensemble([recipes[m] for m in members], name)
    for name, (source, rule) in RETHRESHOLDED.items():
        if source in recipes:
            recipes[name] = rethreshold(recipes[source], rule, name)
    base = recipes[args.baseline]

    print(f"## Recipes by patient-grouped 5-fold cross-validation of the training split\n")
    print("Every number is out-of-fold: each image scored by the fold model that never saw its patient, at the "
          "threshold (Youden) that fold's own validation split chose. Pooled = all folds' images together, with "
          "a stratified bootstrap 95% CI; Δ = difference from the seed recipe on the same images, with a "
          "patient-clustered paired bootstrap 95% CI (2,000 resamples).\n")
    print("| recipe | folds | ROC-AUC mean ± sd | accuracy mean ± sd | pooled ROC-AUC [95% CI] | pooled accuracy | "
          "recall | specificity | Δ ROC-AUC vs seed [95% CI] | Δ accuracy vs seed [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for r in recipes.values():
        _, y, prob, pred = pooled(r)
        rows.append((metrics.binary_metrics(y, prob, 0.5)["roc_auc"], r, y, prob, pred))
    for auc, r, y, prob, pred in sorted(rows, key=lambda row: -row[0]):
        per_fold = [f["metrics"] for f in r["folds"]]
        ci = metrics.bootstrap_ci(y, prob, 0.5, n_resamples=2000, seed=0)["roc_auc"]
        (tn, fp), (fn, tp) = metrics.confusion(y, pred)
        sd = lambda k: f"{np.mean([m[k] for m in per_fold]):.4f} ± {np.std([m[k] for m in per_fold], ddof=1):.4f}"  # noqa: E731
        delta = "—"
        dacc = "—"
        if r is not base:
            c = compare(base, r)
            delta = "{diff:+.4f} [{0:+.4f}, {1:+.4f}]".format(*c["roc_auc"]["ci"], diff=c["roc_auc"]["diff"])
            dacc = "{diff:+.4f} [{0:+.4f}, {1:+.4f}]".format(*c["accuracy"]["ci"], diff=c["accuracy"]["diff"])
        print(f"| {r['name']} | {len(r['folds'])}/{r['n_folds']} | {sd('roc_auc')} | {sd('accuracy')} | "
              f"{auc:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {(tp + tn) / len(y):.4f} | {tp / (tp + fn):.4f} | "
              f"{tn / (tn + fp):.4f} | {delta} | {dacc} |")

    print("\n## Threshold rules across folds\n")
    print("The same fold models, each fold's threshold chosen on its own validation split by each rule. A rule "
          "that holds up keeps accuracy and sensitivity steady from fold to fold, not just on average.\n")
    print("| recipe | rule | fold thresholds | accuracy mean ± sd | worst-fold sensitivity | worst-fold specificity |")
    print("| --- | --- | --- | --- | --- | --- |")
    shifted_recipes = [recipes[n] for n in args.shift if n in recipes]
    by_rule = {(r["name"], rule): rethreshold(r, rule, r["name"]) for r in shifted_recipes for rule in THRESHOLD_RULES}
    for r in shifted_recipes:
        for rule in THRESHOLD_RULES:
            m = [f["metrics"] for f in by_rule[r["name"], rule]["folds"]]
            accs = [x["accuracy"] for x in m]
            thresholds = ", ".join(f"{x['threshold']:.2f}" for x in m)
            print(f"| {r['name']} | {rule} | {thresholds} | "
                  f"{np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f} | {min(x['recall'] for x in m):.3f} | "
                  f"{min(x['specificity'] for x in m):.3f} |")

    print(f"\n## Prevalence shift: out-of-fold images re-weighted to {args.prevalence:.1%} pneumonia\n")
    print("The official test split has 62.5% pneumonia against 74.3% in train. Re-weighting each class "
          "(label shift) leaves sensitivity, specificity and ROC-AUC unchanged and moves accuracy, PPV and "
          "calibration. Thresholds come from each fold's validation split, under each rule; 'prior-corrected' "
          "shifts every logit by log-odds(target) - log-odds(training prevalence) before the 0.5 cut.\n")
    print("| recipe | threshold rule | accuracy (train prevalence) | accuracy (re-weighted) | sensitivity | "
          "specificity | PPV (re-weighted) | mean predicted P (re-weighted; ideal "
          f"{args.prevalence:.3f}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in shifted_recipes:
        variants = [(rule, by_rule[r["name"], rule]) for rule in THRESHOLD_RULES]
        variants.append(("prior-corrected 0.5", prior_corrected(r, args.prevalence)))
        for rule, variant in variants:
            _, y, prob, pred = pooled(variant)
            w = metrics.prevalence_weights(y, args.prevalence)
            plain = metrics.weighted_metrics(y, pred, 0.5, np.ones_like(w))
            shifted = metrics.weighted_metrics(y, pred, 0.5, w)
            mean_p = float((w * prob).sum() / w.sum())
            print(f"| {r['name']} | {rule} | {plain['accuracy']:.4f} | {shifted['accuracy']:.4f} | "
                  f"{shifted['recall']:.4f} | {shifted['specificity']:.4f} | {shifted['precision']:.4f} | "
                  f"{mean_p:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
