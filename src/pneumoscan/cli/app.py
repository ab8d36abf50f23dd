"""Command line: argument parsing only; each command calls one library function.

Every command is an ``add_X`` (its parser) / ``cmd_X`` (its run) pair. Training settings are
declared in config.py once: a flag here names the setting, and its type, choices and default come
from there. Mistakes in the input (missing folders, unreadable images, unknown names) end with one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.core import config
from pneumoscan.cli import console
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError

log = logging.getLogger("pneumoscan")

CAM_METHODS = ("gradcam", "gradcam++", "eigencam")  # explain.METHODS; not imported here to keep --help fast
ENGINES = ("auto", "onnx", "torch")  # inference.loading.KINDS, likewise
SETTING = "setting:"  # dest prefix of flags that set a config field: "setting:train.epochs"

DESCRIPTION = """\
pneumoscan: pneumonia detection in chest X-rays (NORMAL vs PNEUMONIA).

A screening aid and second opinion, not a diagnosis. Typical use:
  pneumoscan explore  --data chest_xray --out explore/
  pneumoscan train    --data chest_xray --backbone-weights mobilenet_v2_imagenet.pth
  pneumoscan evaluate --model runs/RUN/model.pt --data chest_xray --out eval/ --report
  pneumoscan compare  runs/
  pneumoscan predict  --model runs/RUN/model.pt new_images/ --out predictions.csv

Data layout: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|jpg|png|dcm (any split may be
missing), or simply DIR/{NORMAL,PNEUMONIA}/. Label 0 = NORMAL, 1 = PNEUMONIA.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default once, as "[value]": appended from the parser's default when there is
    one; training flags (default None, so an unset flag leaves the config alone) carry the
    config's default in their help text instead. A one-line description is wrapped to the
    terminal; one with line breaks is printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "%(default)" in help or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS or action.default == []:
            return help
        return f"{help} [%(default)s]"


def add_parser(sub, name: str, help: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          formatter_class=_Formatter, **kwargs)


def skipped_line(path: str, reason: str) -> str:
    """One line per skipped file, whether the library's reason already starts with the path or not."""
    return f"pneumoscan: skipped {path}: {reason.removeprefix(f'{path}: ')}"


# --- explore ------------------------------------------------------------------------------------

def add_explore(sub) -> None:
    p = add_parser(sub, "explore", "describe a dataset: counts, samples, sizes, duplicates, patients",
                   "Describes a dataset without training anything. Writes to OUT: summary.md (images and "
                   "patients per split and class, image sizes and modes, unreadable files, duplicates, patients "
                   "in more than one split, balanced class weights), counts.csv, class_counts.png, samples.png "
                   "(sample images per class), image_stats.csv (one row per file), duplicates.csv and "
                   "patient_overlap.csv.")
    p.add_argument("--data", required=True, help="dataset root or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=8, help="sample images per class in samples.png")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample images shown")
    p.set_defaults(func=cmd_explore)


def cmd_explore(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import explore

    explore.explore(args.data, args.out, n_samples=args.samples, seed=args.seed)
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return 0


# --- train / cv ---------------------------------------------------------------------------------

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
                               started=lambda folder: run_log.attach(folder / "train.log"))
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


# --- evaluate / predict / explain ---------------------------------------------------------------

def add_labelled_data_options(p) -> None:
    """What evaluate and robustness both read: a model and labelled films, and where to write."""
    p.add_argument("--model", help="model.pt or .onnx [the bundled model]")
    p.add_argument("--data", required=True, help="dataset root (its test/ split is used) or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", help="which split to use when DATA has several [test]")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def add_evaluate(sub) -> None:
    p = add_parser(sub, "evaluate", "measure a model on labelled images (metrics with 95%% CIs, plots)",
                   "Writes OUT/metrics.json (with stratified-bootstrap 95% CIs, Brier score, ECE and recall per "
                   "pneumonia subtype), OUT/predictions.csv and plots (ROC, PR, reliability), OUT/errors.csv "
                   "with Grad-CAM galleries of the most confident mistakes in OUT/errors/, OUT/evaluate.log, and "
                   "with --report one self-contained OUT/report.html. Scores come from the same engine as predict and "
                   "serve (--engine). The threshold is the one stored in the model (its rule is in the model card: "
                   "fixed, or fitted on validation data) unless --threshold overrides it.")
    add_labelled_data_options(p)
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--errors", type=int, default=16, metavar="K",
                   help="explain the K most confident false positives and false negatives in OUT/errors/ (0 = off)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for the errors")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html, one self-contained page")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="runtime for scores: auto = ONNX Runtime, as predict and serve use (PyTorch if export fails)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan.modeling import artifact
    from pneumoscan.evaluation import evaluate

    model = artifact.resolve(args.model)  # the report links the model's run folder: a real path, not None
    run_log = console.start_run_log()
    bars = console.StageBars()
    try:
        result = evaluate.run(model, args.data, args.out, threshold=args.threshold, split=args.split,
                     strict=args.strict, n_bootstrap=args.bootstrap, engine=args.engine,
                     decode_progress=lambda k: bars("decoding images", k, 0),
                     errors=args.errors, method=args.method, report=args.report)
    finally:
        bars.close()
        if Path(args.out).is_dir():
            run_log.attach(Path(args.out) / "evaluate.log")
        run_log.close()
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    if "n_in_training_data" in result and result["n_in_training_data"] != 0:
        print(f"pneumoscan: warning: {evaluate.overlap_sentence(result['n_in_training_data'], result['n'])}",
              file=sys.stderr)
    if args.errors > 0:  # the same words as the report
        (_, fp), (fn, _) = result["confusion_matrix"]
        errors_dir = Path(args.out) / "errors"
        print("errors:  no errors at this threshold" if not fp + fn else
              f"errors:  {errors_dir}" if errors_dir.is_dir() and any(errors_dir.glob("*.png")) else
              f"errors:  {Path(args.out) / 'errors.csv'} (not explained: Grad-CAM needs the model.pt)")
    if args.report:
        print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def add_robustness(sub) -> None:
    p = add_parser(sub, "robustness", "how a model's numbers move under acquisition shifts, on your labelled films",
                   "Re-films every labelled image 26 ways (exposure, contrast, gamma, blur, sharpening, noise, JPEG, "
                   "resolution, zoom in and out, borders, letterboxing, burned-in markers, rotation) and writes "
                   "OUT/robustness.json and OUT/robustness.md: ROC-AUC, accuracy, sensitivity and specificity at the "
                   "model's own threshold, specificity at sensitivity 0.95, and ECE per shift, with the worst case. "
                   "A model whose specificity collapses under a mild shift will do the same on another machine's films.")
    add_labelled_data_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto", help="runtime for scores [auto = ONNX Runtime]")
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import robustness

    bars = console.StageBars()
    try:
        result = robustness.run(args.model, args.data, args.out, split=args.split, engine=args.engine,
                                strict=args.strict, progress=lambda k, n: bars("shifts", k, n))
    finally:
        bars.close()
    w = result["worst_case"]
    print(f"worst case over {len(result['rows']) - 1} shifts: specificity {w['worst_specificity']:.3f}, "
          f"sensitivity {w['worst_sensitivity']:.3f}, ROC-AUC {w['worst_roc_auc']:.3f}, ECE {w['worst_ece']:.3f}")
    if result.get("n_in_training_data"):
        print(f"pneumoscan: warning: {result['n_in_training_data']} of {result['n_images']} images were in the "
              "model's training data; the numbers are optimistic", file=sys.stderr)
    print(f"table:   {Path(args.out) / 'robustness.md'}")
    return 0


# as the web CSV; flags are ";"-separated codes, flag_details their sentences, " | "-separated
PREDICTION_COLUMNS = ["path", "probability", "prediction", "label", "threshold", "flags", "flag_details",
                      "model_sha256"]


def add_predict(sub) -> None:
    p = add_parser(sub, "predict", "score new images; CSV of probabilities",
                   "Scores unlabelled images and writes one CSV row per image (to stdout, or to --out): path, "
                   "P(PNEUMONIA), the 0/1 prediction and its label at the model's threshold, that threshold, "
                   "flags and the model file's sha256. An image the model is not competent for (flag "
                   "not_chest_xray or low_quality) is labelled NOT_ASSESSED, its probability not meaningful; one in the "
                   "model's UNSURE band (its conformal prediction set is not a single class) is labelled UNSURE, "
                   "its prediction still the threshold's class; "
                   "out_of_distribution keeps the label but marks the image as unlike the training films. "
                   "Unreadable files are named on stderr and skipped (exit status 2); with --explain also one "
                   "Grad-CAM PNG per image.")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here instead of stdout")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="runtime: auto = ONNX Runtime through a cached export (PyTorch if export fails)")
    p.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM overlay PNG per image to DIR")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for --explain")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscan.core import files
    from pneumoscan.commands import predict

    rows, skipped = predict.predict_files(args.model, args.paths, threshold=args.threshold, engine=args.engine)
    table = [(r.path, f"{r.probability:.6f}", "" if r.prediction is None else r.prediction, r.label,
              round(r.threshold, 6), ";".join(r.flags), " | ".join(r.details), r.model_sha256) for r in rows]
    for path, reason in skipped:
        print(skipped_line(path, reason), file=sys.stderr)
    unreadable = f"; skipped {console.plural(len(skipped), 'unreadable file')}" if skipped else ""
    if args.out:
        files.write_csv(args.out, PREDICTION_COLUMNS, table)
        print(f"wrote {console.plural(len(rows), 'prediction')} to {args.out}{unreadable}", file=sys.stderr)
    else:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows(table)
        if len(skipped) > 1:
            print(f"pneumoscan: {unreadable.removeprefix('; ')}", file=sys.stderr)
    if args.explain and rows:
        from pneumoscan.evaluation import explain

        written, _ = explain.explain_files(args.model, [r.path for r in rows], args.explain, args.method,
                                           threshold=args.threshold)
        print(f"wrote {console.plural(len(written), 'explanation')} to {args.explain}", file=sys.stderr)
    return 2 if skipped else 0


def add_explain(sub) -> None:
    p = add_parser(sub, "explain", "Grad-CAM overlays: where in each X-ray the PNEUMONIA score came from",
                   "Writes one PNG per image: the X-ray beside its heat map, titled with P(PNEUMONIA) and the "
                   "predicted label, and OUT/explanations.csv (per image: the scale, whether the map is flat, and the share "
                   "of its mass outside the lung fields and on the border). Warm regions raised the PNEUMONIA score; "
                   "with --scale absolute (default) a map's brightest colour is the image's probability, so a low "
                   "score looks low; relative scales each map to its own maximum. Maps are coarse and are not a "
                   "localisation of disease.")
    p.add_argument("--model", help="model.pt [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="gradcam, gradcam++ or eigencam")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold for the label")
    p.add_argument("--scale", choices=("absolute", "relative"), default="absolute",
                   help="colour scale: absolute = the map times P(PNEUMONIA); relative = each map to its own maximum")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import explain

    written, skipped = explain.explain_files(args.model, args.paths, args.out, args.method, threshold=args.threshold,
                                              scale=args.scale)
    for path, reason in skipped:
        print(skipped_line(path, reason), file=sys.stderr)
    print(f"wrote {console.plural(len(written), 'explanation')} to {args.out}")
    return 2 if skipped else 0


# --- adapt --------------------------------------------------------------------------------------

def add_adapt(sub) -> None:
    p = add_parser(sub, "adapt", "re-base a model's probabilities on a site's pneumonia prevalence",
                   "Estimates the site's pneumonia prevalence from its unlabelled films (EM, Saerens, Latinne & "
                   "Decaestecker 2002; 95% CI by bootstrap over the films) and writes a copy of the model whose "
                   "logits are shifted by logit(site) - logit(calibration prevalence). A threshold from a "
                   "prevalence-independent rule (youden, sensitivity:X) and the UNSURE band keep their logits; a "
                   "plain probability cut (e.g. 0.5) stays a probability. With --labels the temperature, threshold "
                   "and UNSURE band are re-fitted on the site's labelled films. The input model is never changed.")
    p.add_argument("--model", help="model.pt, or an exported .onnx (not with --labels) [the bundled model]")
    p.add_argument("--images", metavar="DIR", help="the site's unlabelled films (searched recursively)")
    p.add_argument("--db", metavar="URL", help="instead: re-fit temperature, threshold and UNSURE band on the result "
                   "store's read films (patient-grouped cross-fitting; registers the new version)")
    p.add_argument("--sensitivity-floor", type=float, default=0.95, metavar="F",
                   help="with --db: the threshold keeps the site sensitivity at or above F")
    p.add_argument("--out", required=True, help="the adapted copy to write (same suffix as the input)")
    p.add_argument("--labels", metavar="DIR", help="labelled site films (NORMAL/ and PNEUMONIA/) to re-fit the "
                   "temperature, threshold and UNSURE band on")
    p.add_argument("--train-prior", type=float, metavar="P", help="the PNEUMONIA share the model was calibrated at, "
                   "for models that do not record it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the estimate's CI")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from pneumoscan.safety import adapt

    if args.bootstrap < 1:
        raise UserError("--bootstrap must be at least 1")
    if args.db:
        from pneumoscan.cli.pilot import adapt_from_db

        return adapt_from_db(args)
    if not args.images:
        raise UserError("give --images DIR (unlabelled films) or --db URL (the store's read films)")
    result = adapt.run(args.model, args.images, args.out, labels=args.labels, train_prior=args.train_prior,
                       n_bootstrap=args.bootstrap)
    for warning in result["warnings"]:
        print(f"pneumoscan: warning: {warning}", file=sys.stderr)
    print(adapt.summary(result))
    return 0


# --- compare / experiments / export -------------------------------------------------------------

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


def add_export(sub) -> None:
    p = add_parser(sub, "export", "export a model to ONNX (optionally INT8), checked against PyTorch",
                   "Writes an ONNX model whose metadata carries the model's meta (input size,\n"
                   "threshold, class names...), checked against PyTorch. Input 'image': float32 (N,1,H,W)\n"
                   "in [0,1]; output 'logit': (N,); P(PNEUMONIA) = sigmoid(logit).\n"
                   "With --int8 also writes OUT.int8.onnx, calibrated on half of DIR's patients and kept\n"
                   "only if its ROC-AUC on the other half is within 0.005 of fp32's.")
    p.add_argument("--model", help="model.pt [the bundled model]")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--int8", action="store_true", help="also write a static INT8 model")
    p.add_argument("--calibration", metavar="DIR", help="labelled images (NORMAL/, PNEUMONIA/ or a split layout) "
                   "for INT8 calibration and its ROC-AUC check")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pneumoscan.modeling import artifact
    from pneumoscan.commands import export

    if args.calibration and not args.int8:
        raise UserError("--calibration is only used with --int8")
    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration DIR (labelled NORMAL/PNEUMONIA images) to fit and check it")
    out = export.export_onnx(artifact.resolve(args.model), args.out, opset=args.opset)
    print(f"onnx: {out}")
    if not args.int8:
        return 0
    int8_out = out.with_name(out.stem + ".int8" + out.suffix)
    report = export.quantize_checked(out, int8_out, args.calibration)
    summary = (f"ROC-AUC int8 {report['int8_roc_auc']:.4f} vs fp32 {report['fp32_roc_auc']:.4f} on "
               f"{report['n']} held-out images (Δ {report['delta']:+.4f}, tolerance {report['tolerance']})")
    if not report["written"]:
        print(f"pneumoscan: int8 model not written: {summary}", file=sys.stderr)
        return 1
    print(f"int8: {int8_out} ({summary})")
    return 0


# --- serve --------------------------------------------------------------------------------------

def add_serve(sub) -> None:
    from pneumoscan.serve import settings
    from pneumoscan.io.budget import DEFAULT_DECODE_BUDGET_BYTES, DEFAULT_TOTAL_DECODE_BYTES
    from pneumoscan.serve.settings import API_KEY_ENV, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

    p = add_parser(sub, "serve", "REST API and web page for radiologists",
                   "Serve the model over HTTP: a web page at / (drop X-rays or DICOMs, see scores, Grad-CAM "
                   "overlays and a worklist sorted by probability), the REST API under /v1 and its docs at "
                   f"/docs. Works offline. Set ${API_KEY_ENV} to require an X-API-Key header on the API.")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="per file")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per image, read from its header")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="runtime for scores")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable); none by default")
    p.add_argument("--micro-batch", type=int, default=settings.DEFAULT_MICRO_BATCH, metavar="N",
                   help="images per model call when requests queue up; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=settings.DEFAULT_MAX_WAIT_MS,
                   help="how long a batch waits to fill")
    p.add_argument("--queue-size", type=int, default=settings.DEFAULT_QUEUE_SIZE,
                   help="requests waiting to be scored before new ones get 503 busy")
    p.add_argument("--score-timeout", type=float, default=settings.DEFAULT_SCORE_TIMEOUT_S, metavar="S",
                   help="seconds a request may wait for its score before a 504")
    g = p.add_argument_group("hostile and slow clients")
    g.add_argument("--header-timeout", type=float, default=settings.DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                   help="seconds for a request's head to arrive (half a head: 408 and closed; nothing: closed)")
    g.add_argument("--body-timeout", type=float, default=settings.DEFAULT_BODY_TIMEOUT_S, metavar="S",
                   help="seconds for a request's body to arrive once its head has (else 408 and closed)")
    g.add_argument("--keep-alive", type=float, default=settings.DEFAULT_KEEP_ALIVE_S, metavar="S",
                   help="seconds an idle keep-alive connection stays open")
    g.add_argument("--max-connections", type=int, default=settings.DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; a new one beyond evicts the longest idle (kept under the open-file limit)")
    g.add_argument("--max-in-flight", type=int, default=settings.DEFAULT_MAX_IN_FLIGHT, metavar="N",
                   help="requests handled at once; beyond, 503 with Retry-After")
    g.add_argument("--grace-seconds", type=float, default=settings.DEFAULT_GRACE_S, metavar="S",
                   help="on SIGTERM/Ctrl+C, how long requests in flight may take to finish (then 503); exit 0")
    g.add_argument("--decode-budget-mb", type=float, default=DEFAULT_DECODE_BUDGET_BYTES / 2**20, metavar="MB",
                   help="memory one image's decoding may take, estimated from its header (over it: 413)")
    g.add_argument("--decode-total-mb", type=float, default=DEFAULT_TOTAL_DECODE_BYTES / 2**20, metavar="MB",
                   help="memory all concurrent decodes may take together (later ones wait)")
    p.set_defaults(func=cmd_serve, log_timestamps=True)  # a server's log is read later: every line is dated


def cmd_serve(args: argparse.Namespace) -> int:
    from pneumoscan.io import budget
    from pneumoscan.serve import server, settings
    from pneumoscan.serve.app import create_app
    from pneumoscan.serve.batcher import BatchSettings
    from pneumoscan.serve.logqueue import queued_logging
    from pneumoscan.core.logpolicy import capture_decoder_warnings

    try:
        batching = BatchSettings(args.micro_batch, args.max_wait_ms, args.queue_size, args.score_timeout)
    except ValueError:
        raise UserError("--micro-batch and --queue-size must be at least 1, --max-wait-ms at least 0 and "
                        "--score-timeout positive") from None
    timeouts = (args.header_timeout, args.body_timeout, args.keep_alive, args.grace_seconds)
    if min(timeouts) <= 0 or min(args.max_connections, args.max_in_flight) < 1 or \
            min(args.decode_budget_mb, args.decode_total_mb) <= 0:
        raise UserError("timeouts, --grace-seconds and decode budgets must be positive; --max-connections and "
                        "--max-in-flight at least 1")
    budget.configure(int(args.decode_budget_mb * settings.MiB), int(args.decode_total_mb * settings.MiB))
    app = create_app(args.model, max_upload_bytes=int(args.max_upload_mb * settings.MiB),
                     max_pixels=args.max_pixels, engine=args.engine, cors_origins=args.cors_origin,
                     batching=batching, max_in_flight=args.max_in_flight, body_timeout_s=args.body_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(settings.API_KEY_ENV):
        log.warning("listening on %s without an API key: anyone who can reach this port can use it "
                    "(set %s)", args.host, settings.API_KEY_ENV)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"pneumoscan: open http://{shown}:{args.port}/ in a browser (API docs at /docs); Ctrl+C stops",
          file=sys.stderr)
    # access_log off: the app logs method, path, status, latency and size, and nothing else;
    # through a queue, so a slow reader of the log never stalls the event loop.
    # On SIGTERM / Ctrl+C requests still running get --grace-seconds to finish, then 503 (serve.server).
    limits = server.ServerSettings(args.header_timeout, args.keep_alive, args.max_connections, args.grace_seconds)
    with queued_logging(), capture_decoder_warnings():
        server.serve(app, args.host, args.port, limits)
    if getattr(app.state, "service", None) is not None:  # it really served (startup ran) and has shut down
        exit_now(0)
    return 0


def exit_now(code: int) -> None:
    """End a server that has shut down without the interpreter's teardown.

    Freeing torch, torchvision and the grad-cam stack module by module takes about a second on two
    cores (more on a loaded machine) after uvicorn has already said "Finished server process", so
    Ctrl+C seemed to hang. Nothing is left to clean up: the model is read-only, every output was
    written atomically, and the log is flushed here; so the process leaves at once.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- main ---------------------------------------------------------------------------------------

from pneumoscan.cli import pilot as pilot_cli  # noqa: E402  (the pilot commands, kept apart)

COMMANDS = (add_explore, add_train, add_cv, add_evaluate, add_robustness, add_predict, add_explain, add_adapt,
            add_compare, add_experiments, add_ensemble, add_export, add_serve, *pilot_cli.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure_logging(args.verbose, timestamps=getattr(args, "log_timestamps", False))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
