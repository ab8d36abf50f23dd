"""The commands that train: train, cv, experiments, ensemble, and compare for their run folders.

Training settings are declared in ``core.config`` once: a flag here names the setting, and its
type, choices and default come from there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumoscan.cli import console
from pneumoscan.cli.common import SETTING, add_parser
from pneumoscan.core import config
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError


TRAIN_DESCRIPTION = (
    "Train a classifier. The default recipe is the one the shift protocol chose (benchmarks/robustness.md): a "
    "deep ensemble of two frozen ImageNet backbones with the seed study's head: a MobileNetV2 trained on films "
    "degraded as other hospitals' are ('acquisition' augmentation) with mixup (recipe frozen-acquisition-mixup), "
    "and an EfficientNet-Lite0 with the study's Keras augmentation (recipe seed-study-lite0); each member trains "
    "in RUN/members/NAME on the same split, then RUN/model.pt averages them. --recipe NAME trains one model instead (seed-study, frozen-acquisition, finetune = the former default, "
    "lp-ft, wise-ft, ...). Writes a run folder with config, data manifest, curves, checkpoints, train.log and "
    "model.pt.")


def add_train(sub) -> None:
    p = add_parser(sub, "train", "train a model on a folder of labelled X-rays", TRAIN_DESCRIPTION,
                   usage="%(prog)s (--data DIR | --resume RUN_FOLDER) [options]")
    add_training_options(p)
    p.add_argument("--resume", metavar="RUN_FOLDER",
                   help="continue an interrupted run from its last checkpoint (its config.yaml; --data not needed)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from pneumoscan.training import ensemble

    config = config_from_args(args)
    run_log = console.start_run_log()  # RUN/train.log, from the first line, once fit creates RUN
    bars = console.StageBars()
    try:
        run_dir = ensemble.fit(config, resume_dir=args.resume, progress=bars,
                               callbacks_for=lambda: console.training_callbacks(run_log),
                               started=lambda folder: run_log.attach(folder / "train.log")).run_dir
    except KeyboardInterrupt:
        print("\ninterrupted; continue with: pneumoscan train --resume RUN_FOLDER", file=sys.stderr)
        return 130
    finally:
        bars.close()
        run_log.close()
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # under DDP, rank 0 finishes the run (and says so) after the others exit
        return 0
    print(f"run folder: {run_dir}")
    print(f"model:      {run_dir / 'model.pt'}")
    if (run_dir / "test" / "metrics.json").exists():
        print(f"test metrics: {run_dir / 'test' / 'metrics.json'}")
    if (run_dir / "report.html").exists():
        print(f"report:     {run_dir / 'report.html'}")
    return 0


def add_cv(sub) -> None:
    p = add_parser(sub, "cv", "patient-grouped k-fold cross-validation of a training recipe",
                   "Trains the recipe k times on the train (and val) images, each time testing on patients the "
                   "fold never saw; writes per-fold and pooled out-of-fold metrics (cv.md, cv.json, "
                   "oof_predictions.csv). An ensemble recipe (the default) trains every member on each fold and "
                   "scores the fold with their ensemble. The data's own test split is never used.",
                   usage="%(prog)s --data DIR [options]")
    add_training_options(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds")
    p.add_argument("--split-seed", type=int, default=42,
                   help="seed of the fold assignment, kept apart from --seed so recipes meet the same patients")
    p.set_defaults(func=cmd_cv, resume=None)


def cmd_cv(args: argparse.Namespace) -> int:
    from pneumoscan.training import cv

    config = config_from_args(args)
    console.route_lightning_logs()
    bars = console.StageBars()
    try:
        out = cv.cross_validate(config, folds=args.folds, progress=bars, split_seed=args.split_seed)
    finally:
        bars.close()
    print((out / "cv.md").read_text())
    print(f"cross-validation folder: {out}")
    return 0


def add_setting(group, flag: str, key: str, help: str, *, shown=None, **kwargs) -> None:
    """A flag that sets config field ``key``: type, choices and the [default] shown come from
    config.py. Its own default stays None, so an unset flag leaves the recipe or --config alone."""
    kind = config.setting_type(key)
    if kind is bool:
        kwargs.setdefault("action", "store_true")
    else:
        kwargs.setdefault("type", kind)
        if "choices" not in kwargs:
            kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    value = config.default(key) if shown is None else shown
    if value != "" and help != argparse.SUPPRESS and kind is not bool:
        help = f"{help} [{value}]"
    group.add_argument(flag, dest=SETTING + key, default=None, help=help, **kwargs)


def add_training_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", dest=SETTING + "data.root", default=None, metavar="DIR",
                   help="dataset root (train/ and optionally val/, test/); required unless --resume, or a "
                   "--config/--set gives data.root")
    add_setting(g, "--image-size", "data.image_size", "square input size in pixels")
    add_setting(g, "--val-fraction", "data.val_fraction", "validation share carved from train, grouped by "
                f"patient, when val/ has < {d.data.min_val_images} images")
    add_setting(g, "--augment", "data.augment", "training augmentation: the study's Keras one (seed), without "
                "its horizontal flip, or milder geometry plus contrast/brightness/gamma (radiograph)",
                choices=config.AUGMENTATIONS)
    add_setting(g, "--class-weights", "data.class_weights", "loss weights per class", choices=config.CLASS_WEIGHT_MODES)
    add_setting(g, "--strict", "data.strict", "stop at the first unreadable image")
    add_setting(g, "--batch-size", "data.batch_size", "images per batch")
    add_setting(g, "--workers", "data.num_workers", "DataLoader worker processes")
    g = p.add_argument_group("model")
    add_setting(g, "--backbone", "model.backbone", f"one of {', '.join(config.BACKBONES)}")
    add_setting(g, "--backbone-weights", "model.backbone_weights", "'imagenet' (torchvision's, needs internet "
                "once), 'none' (random init) or a local state_dict file")
    add_setting(g, "--weights-normalization", "model.weights_normalization", "input normalisation the weights "
                "expect; 'auto' knows torchvision's and the shared file", choices=config.WEIGHTS_NORMALIZATIONS)
    add_setting(g, "--head", "model.head", f"head name ({', '.join(config.HEAD_NAMES)}) or a spec like "
                "'64,bn,d0.3,32'")
    add_setting(g, "--unfreeze-blocks", "model.unfreeze_blocks",
                "train the last N backbone stages (-1 = all, 0 = frozen)")
    add_setting(g, "--batchnorm", "model.batchnorm", "BatchNorm statistics of trainable stages: update them, "
                "or keep the pretrained ones", choices=config.BATCHNORM_MODES)
    g = p.add_argument_group("optimisation")
    add_setting(g, "--epochs", "train.epochs", "maximum epochs")
    add_setting(g, "--lr", "train.lr", "head learning rate")
    add_setting(g, "--backbone-lr", "train.backbone_lr", "learning rate of unfrozen stages")
    add_setting(g, "--patience", "train.patience", "early-stopping patience in epochs")
    add_setting(g, "--schedule", "train.schedule", "learning-rate schedule", choices=config.SCHEDULES)
    add_setting(g, "--label-smoothing", "train.label_smoothing", "BCE label smoothing")
    add_setting(g, "--weight-decay", "train.weight_decay", "AdamW decoupled weight decay (0: plain Adam)")
    add_setting(g, "--mixup", "train.mixup", "mixup Beta(a, a) parameter (0: off)")
    add_setting(g, "--unfreeze-at", "train.unfreeze_at", "progressive unfreezing, e.g. '1:3,3:-1' = last 3 "
                "stages train from epoch 2, all from epoch 4 (epochs counted from 0)", metavar="EPOCH:STAGES,...",
                shown="off")
    add_setting(g, "--threshold", "train.threshold", f"decision threshold rule on validation: {config.THRESHOLD_RULES}")
    add_setting(g, "--seed", "train.seed", "random seed (split, initialisation, augmentation)")
    add_setting(g, "--precision", "train.precision", "numeric precision; auto = bf16 on a GPU that has it",
                choices=config.PRECISIONS)
    add_setting(g, "--max-train-batches", "train.max_train_batches", argparse.SUPPRESS)
    g.add_argument("--no-feature-cache", dest=SETTING + "train.feature_cache", action="store_false", default=None,
                   help="with a frozen backbone, run it on every batch instead of training the head on "
                   "cached features (the slow path; same model, ~50x slower)")
    add_setting(g, "--views", "train.views", "augmented views per image in the feature cache")
    add_setting(g, "--cache-dir", "train.cache_dir", "feature cache folder", shown="OUT/.feature-cache")
    g = p.add_argument_group("scale out (Lightning)")
    add_setting(g, "--devices", "train.devices", "devices per node (-1 = all)")
    add_setting(g, "--num-nodes", "train.num_nodes", "machines")
    add_setting(g, "--strategy", "train.strategy", "e.g. ddp")
    g = p.add_argument_group("run")
    g.add_argument("--recipe", help="starting point: default (an ensemble of frozen-acquisition-mixup and "
                   "seed-study-lite0), "
                   "one of config.RECIPES, e.g. seed-study (frozen backbone, "
                   "Keras augmentation, 30 epochs, patience 7); --config, --set and flags override it [default]")
    g.add_argument("--config", help="YAML with data/model/train sections (--set and flags override it)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any setting, e.g. --set train.lr=3e-4 --set data.augment=seed (repeatable; after "
                   "--recipe and --config, before the flags above)")
    add_setting(g, "--out", "out_dir", "folder for run folders")
    add_setting(g, "--name", "name", "run folder name", shown="timestamp-backbone")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--recipe (default: the package defaults) < --config file < --set < explicit flags, each
    step validated (RunConfig.validate) before anything is decoded or written."""
    run_config = config.recipe(getattr(args, "recipe", None) or "default")
    if args.config:
        try:
            run_config = RunConfig.from_dict(config.merge(run_config.to_dict(), read_config_file(args.config)))
        except config.ConfigError as exc:
            raise UserError(f"{args.config}: {exc}") from None
    flags = {key.removeprefix(SETTING): value for key, value in vars(args).items()
             if key.startswith(SETTING) and value is not None}
    run_config = config.apply_overrides(config.apply_overrides(run_config, args.overrides), flags)
    if not run_config.data.root and not args.resume:
        raise UserError("--data is required (a folder with train/NORMAL and train/PNEUMONIA), unless --resume")
    return run_config


def read_config_file(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected data/model/train sections, not {type(raw).__name__}")
    return raw


def add_compare(sub) -> None:
    p = add_parser(sub, "compare", "table of several runs' configs and metrics, best validation ROC-AUC first",
                   "Prints a markdown table of each run's configuration (backbone, head, augmentation, unfrozen "
                   "blocks, weights, epochs, seconds per epoch) and its validation and test metrics with 95% CIs, "
                   "sorted by validation ROC-AUC. A folder without model.pt is searched one level down, so "
                   "'compare runs/' works.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or folders of run folders)")
    p.add_argument("--out", help="also write compare.md and compare.csv (every column, CIs included) here")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import compare

    print(compare.compare(args.runs, args.out), end="")
    if args.out:
        print(f"\nwritten: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.csv'}", file=sys.stderr)
    return 0


def add_experiments(sub) -> None:
    p = add_parser(sub, "experiments", "train a grid of variants x seeds, tracked in MLflow, mean ± sd table",
                   "Trains every named run of a grid file on each seed (run folders OUT/<name>-s<seed>, one "
                   "shared feature cache), tracks each in MLflow and writes OUT/comparison.md and .csv: mean ± "
                   "sd over seeds of validation and test metrics, best mean validation ROC-AUC first. See "
                   "experiments/*.yaml for the grid format. Needs: pip install 'pneumoscan[tracking]'.")
    p.add_argument("--grid", required=True, help="grid YAML: base: (a config), seeds: [...], runs: [{name: ..., ...}]")
    p.add_argument("--seeds", type=int, help="train N consecutive seeds from the grid's first [the grid's seeds]")
    p.add_argument("--data", help="dataset root, overriding the grid's base data.root")
    p.add_argument("--out", help="output folder [BASE_OUT_DIR/<grid name>]")
    p.add_argument("--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db]")
    p.set_defaults(func=cmd_experiments)


def cmd_experiments(args: argparse.Namespace) -> int:
    from pneumoscan.training import experiments

    console.route_lightning_logs()
    bars = console.StageBars()
    try:
        out = experiments.run_grid(args.grid, seeds=args.seeds, tracking_uri=args.tracking_uri, out_dir=args.out,
                                   data_root=args.data, progress=bars)
    finally:
        bars.close()
    print((out / "comparison.md").read_text())
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'runs.csv'}", file=sys.stderr)
    return 0


def add_ensemble(sub) -> None:
    p = add_parser(sub, "ensemble", "combine trained runs into one multi-member model (a deep ensemble)",
                   "Writes OUT/model.pt: the runs' models averaged (mean of their calibrated logits),\n"
                   "with its own temperature and threshold fitted on the runs' shared validation split\n"
                   "and an out-of-distribution detector on all members' features. Every run must have\n"
                   "the same image size and the same validation images (same data, val_fraction, seed).\n"
                   "predict, explain, evaluate, export and serve take the file like any model.pt.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run folders (pneumoscan train's output)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write model.pt and validation/ to")
    p.add_argument("--threshold", metavar="RULE", help="threshold rule, fitted on validation [the first run's]")
    p.add_argument("--no-ood", action="store_true", help="no out-of-distribution detector")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    p.set_defaults(func=cmd_ensemble)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumoscan.training import ensemble

    if args.threshold is not None:
        problem = config.check_threshold_rule(args.threshold, "--threshold")
        if problem:
            raise UserError(problem)
    bars = console.StageBars()
    try:
        out = ensemble.combine(args.runs, args.out, threshold_rule=args.threshold, ood=False if args.no_ood else None,
                               strict=args.strict, progress=bars)
    finally:
        bars.close()
    print(f"model:      {out / 'model.pt'}")
    print(f"validation: {out / 'validation' / 'metrics.json'}")
    return 0
