"""Command line: argument parsing only; each command calls one library function.

Mistakes in the input (missing folders, unreadable images, unknown names) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml

from pneumoscan import __version__
from pneumoscan.config import RunConfig
from pneumoscan.errors import UserError

log = logging.getLogger("pneumoscan")

CAM_METHODS = ("gradcam", "gradcam++", "eigencam")  # explain.METHODS; not imported here to keep --help fast

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


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class StageBars:
    """tqdm bars for the library's (stage, done, total) progress callbacks; silent when not a terminal."""

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(desc=stage, total=total or None, unit="img", leave=False, file=sys.stderr,
                                    disable=not sys.stderr.isatty())
        bar = self.bars[stage]
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# --- train -------------------------------------------------------------------------------------

# flag -> (config section, field); defaults live in config.py so they are declared once
TRAIN_FLAGS = {
    "data": ("data", "root"), "image_size": ("data", "image_size"), "val_fraction": ("data", "val_fraction"),
    "augment": ("data", "augment"), "class_weights": ("data", "class_weights"), "strict": ("data", "strict"),
    "batch_size": ("data", "batch_size"), "workers": ("data", "num_workers"),
    "backbone": ("model", "backbone"), "backbone_weights": ("model", "backbone_weights"),
    "weights_normalization": ("model", "weights_normalization"), "head": ("model", "head"),
    "unfreeze_blocks": ("model", "unfreeze_blocks"), "batchnorm": ("model", "batchnorm"),
    "schedule": ("train", "schedule"), "label_smoothing": ("train", "label_smoothing"),
    "unfreeze_at": ("train", "unfreeze_at"),
    "epochs": ("train", "epochs"), "lr": ("train", "lr"), "backbone_lr": ("train", "backbone_lr"),
    "patience": ("train", "patience"), "seed": ("train", "seed"), "precision": ("train", "precision"),
    "threshold": ("train", "threshold"), "max_train_batches": ("train", "max_train_batches"),
    "feature_cache": ("train", "feature_cache"), "views": ("train", "views"), "cache_dir": ("train", "cache_dir"),
    "devices": ("train", "devices"), "num_nodes": ("train", "num_nodes"), "strategy": ("train", "strategy"),
    "out": (None, "out_dir"), "name": (None, "name"),
}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--recipe (default: the package defaults) < --config file < explicit flags."""
    from pneumoscan.config import merge, recipe

    config = recipe(getattr(args, "recipe", None) or "default")
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            config = RunConfig.from_dict(merge(config.to_dict(), yaml.safe_load(path.read_text()) or {}))
        except (ValueError, TypeError, yaml.YAMLError) as exc:
            raise UserError(f"{path}: {exc}") from None
    for flag, (section, field) in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(config, section) if section else config, field, value)
    if not config.data.root and not args.resume:
        raise UserError("--data is required (a folder with train/NORMAL and train/PNEUMONIA)")
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from lightning.pytorch.callbacks import TQDMProgressBar

    from pneumoscan import train

    config = config_from_args(args)
    bars = StageBars()
    try:
        run_dir = train.fit(config, resume_dir=args.resume, callbacks=[TQDMProgressBar()], progress=bars)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with: pneumoscan train --resume RUN_FOLDER", file=sys.stderr)
        return 130
    finally:
        bars.close()
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


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a folder of labelled X-rays", formatter_class=_Formatter,
                       description="Train a classifier. The default recipe won 5-fold patient-grouped "
                       "cross-validation (README, 'Accuracy'): ImageNet MobileNetV2 fine-tuned end to end "
                       "with the seed study's head (Dense 64, BN, BN, Dense 32), 'radiograph' augmentation "
                       "(no horizontal flip; contrast/brightness/gamma), balanced class weights, Adam (head "
                       "1e-3, backbone 1e-4, cosine), at most 8 epochs with early stopping on validation "
                       "loss. --recipe seed-study trains the study we started from (frozen backbone). "
                       "Writes a run folder with config, data manifest, curves, checkpoints and model.pt.")
    add_training_options(p)
    p.add_argument("--resume", metavar="RUN_FOLDER", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="patient-grouped k-fold cross-validation of a training recipe",
                       formatter_class=_Formatter,
                       description="Trains the recipe k times on the train (and val) images, each time testing on "
                       "patients the fold never saw; writes per-fold and pooled out-of-fold metrics "
                       "(cv.md, cv.json, oof_predictions.csv). The data's own test split is never used.")
    add_training_options(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds")
    p.add_argument("--split-seed", type=int, default=42,
                   help="seed of the fold assignment, kept apart from --seed so recipes meet the same patients")
    p.set_defaults(func=cmd_cv, resume=None)


def cmd_cv(args: argparse.Namespace) -> int:
    from pneumoscan import cv

    bars = StageBars()
    try:
        out = cv.cross_validate(config_from_args(args), folds=args.folds, progress=bars, split_seed=args.split_seed)
    finally:
        bars.close()
    print((out / "cv.md").read_text())
    print(f"cross-validation folder: {out}")
    return 0


def add_training_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (train/ and optionally val/, test/)")
    g.add_argument("--image-size", type=int, help=f"square input size in pixels [{d.data.image_size}]")
    g.add_argument("--val-fraction", type=float,
                   help=f"validation share carved from train, grouped by patient, when val/ has "
                   f"< {d.data.min_val_images} images [{d.data.val_fraction}]")
    g.add_argument("--augment", choices=["seed", "seed-noflip", "radiograph", "none"],
                   help="training augmentation: the study's Keras one (seed), without its horizontal flip, "
                   f"or milder geometry plus contrast/brightness/gamma (radiograph) [{d.data.augment}]")
    g.add_argument("--class-weights", choices=["balanced", "none"], help=f"[{d.data.class_weights}]")
    g.add_argument("--strict", action="store_true", default=None, help="stop at the first unreadable image")
    g.add_argument("--batch-size", type=int, help=f"[{d.data.batch_size}]")
    g.add_argument("--workers", type=int, help=f"DataLoader worker processes [{d.data.num_workers}]")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help=f"mobilenet_v2, resnet18, efficientnet_b0, densenet121 [{d.model.backbone}]")
    g.add_argument("--backbone-weights",
                   help="'imagenet' (torchvision's, needs internet once), 'none' (random init) or a local "
                   f"state_dict file [{d.model.backbone_weights}]")
    g.add_argument("--weights-normalization", choices=["auto", "imagenet", "inception"],
                   help="input normalisation the weights expect; 'auto' knows torchvision's and the shared file")
    g.add_argument("--head", help=f"head name (seed, exp1..exp10, linear) or spec like '64,bn,d0.3,32' [{d.model.head}]")
    g.add_argument("--unfreeze-blocks", type=int,
                   help=f"train the last N backbone stages (-1 = all, 0 = frozen) [{d.model.unfreeze_blocks}]")
    g.add_argument("--batchnorm", choices=["train", "frozen"],
                   help="BatchNorm statistics of trainable stages: update them, or keep the pretrained "
                   f"ones [{d.model.batchnorm}]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"maximum epochs [{d.train.epochs}]")
    g.add_argument("--lr", type=float, help=f"head learning rate [{d.train.lr}]")
    g.add_argument("--backbone-lr", type=float, help=f"learning rate of unfrozen stages [{d.train.backbone_lr}]")
    g.add_argument("--patience", type=int, help=f"early-stopping patience in epochs [{d.train.patience}]")
    g.add_argument("--schedule", choices=["constant", "cosine"], help=f"learning-rate schedule [{d.train.schedule}]")
    g.add_argument("--label-smoothing", type=float, help=f"BCE label smoothing [{d.train.label_smoothing}]")
    g.add_argument("--unfreeze-at", metavar="EPOCH:STAGES,...",
                   help="progressive unfreezing, e.g. '1:3,3:-1' = last 3 stages train from epoch 2, all from "
                   "epoch 4 (epochs counted from 0)")
    g.add_argument("--threshold", help="decision threshold rule on validation: youden, sensitivity:0.95 or a "
                   f"number [{d.train.threshold}]")
    g.add_argument("--seed", type=int, help=f"[{d.train.seed}]")
    g.add_argument("--precision", choices=["auto", "32", "bf16"], help=f"[{d.train.precision}]")
    g.add_argument("--max-train-batches", type=float, help=argparse.SUPPRESS)
    g.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="with a frozen backbone, run it on every batch instead of training the head on "
                   "cached features (the slow path; same model, ~50x slower)")
    g.add_argument("--views", type=int, help=f"augmented views per image in the feature cache [{d.train.views}]")
    g.add_argument("--cache-dir", help="feature cache folder [OUT/.feature-cache]")
    g = p.add_argument_group("scale out (Lightning)")
    g.add_argument("--devices", type=int, help="devices per node [1]")
    g.add_argument("--num-nodes", type=int, help="[1]")
    g.add_argument("--strategy", help="e.g. ddp [auto]")
    g = p.add_argument_group("run")
    g.add_argument("--recipe", help="starting point: default (fine-tuning) or seed-study (frozen backbone, "
                   "Keras augmentation, 30 epochs, patience 7); --config and flags override it [default]")
    g.add_argument("--config", help="YAML with data/model/train sections (flags override it)")
    g.add_argument("--out", help=f"folder for run folders [{d.out_dir}]")
    g.add_argument("--name", help="run folder name [timestamp-backbone]")


# --- evaluate / predict / explore --------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan import evaluate

    bars = StageBars()
    try:
        evaluate.run(args.model, args.data, args.out, threshold=args.threshold, split=args.split,
                     strict=args.strict, n_bootstrap=args.bootstrap,
                     decode_progress=lambda k: bars("decoding images", k, 0),
                     errors=args.errors, method=args.method, report=args.report)
    finally:
        bars.close()
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    if args.report:
        print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscan import files, predict

    rows, skipped = predict.predict_files(args.model, args.paths, threshold=args.threshold, engine=args.engine)
    header = ["path", "probability", "prediction", "label", "threshold", "model_sha256"]
    table = [(r.path, f"{r.probability:.6f}", r.prediction, r.label, f"{r.threshold:.6f}", r.model_sha256) for r in rows]
    if args.out:
        files.write_csv(args.out, header, table)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(table)
    for path, reason in skipped:
        print(f"pneumoscan: skipped {path}: {reason}", file=sys.stderr)
    if args.explain and rows:
        from pneumoscan import explain

        written, _ = explain.explain_files(args.model, [r.path for r in rows], args.explain, args.method,
                                           threshold=args.threshold)
        print(f"wrote {len(written)} explanations to {args.explain}", file=sys.stderr)
    return 2 if skipped else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumoscan import explain

    written, skipped = explain.explain_files(args.model, args.paths, args.out, args.method, threshold=args.threshold)
    for path, reason in skipped:
        print(f"pneumoscan: skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {len(written)} explanations to {args.out}")
    return 2 if skipped else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pneumoscan import compare

    print(compare.compare(args.runs, args.out), end="")
    if args.out:
        print(f"\nwritten: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.csv'}", file=sys.stderr)
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from pneumoscan import experiments

    bars = StageBars()
    try:
        out = experiments.run_grid(args.grid, seeds=args.seeds, tracking_uri=args.tracking_uri, out_dir=args.out,
                                   data_root=args.data, progress=bars)
    finally:
        bars.close()
    print((out / "comparison.md").read_text())
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'runs.csv'}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pneumoscan import artifact, export

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


def cmd_explore(args: argparse.Namespace) -> int:
    from pneumoscan import explore

    explore.explore(args.data, args.out, n_samples=args.samples, seed=args.seed)
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return 0


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pneumoscan.serve import settings
    from pneumoscan.serve.app import create_app

    app = create_app(args.model, max_upload_bytes=int(args.max_upload_mb * settings.MiB),
                     max_pixels=args.max_pixels, engine=args.engine, cors_origins=args.cors_origin)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(settings.API_KEY_ENV):
        log.warning("listening on %s without an API key: anyone who can reach this port can use it "
                    "(set %s)", args.host, settings.API_KEY_ENV)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"pneumoscan: open http://{shown}:{args.port}/ in a browser (API docs at /docs); Ctrl+C stops",
          file=sys.stderr)
    # access_log off: the app logs method, path, status, latency and size, and nothing else
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=None, server_header=False)
    return 0


def add_serve(sub) -> None:
    from pneumoscan.serve.settings import API_KEY_ENV, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

    p = sub.add_parser("serve", help="REST API and web page for radiologists", formatter_class=_Formatter,
                       description="Serve the model over HTTP: a web page at / (drop X-rays or DICOMs, see "
                       "scores, Grad-CAM overlays and a worklist sorted by probability), the REST API under "
                       f"/v1 and its docs at /docs. Works offline. Set ${API_KEY_ENV} to require an "
                       "X-API-Key header on the API.")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="per file")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per image, read from its header")
    p.add_argument("--engine", choices=["auto", "onnx", "torch"], default="auto", help="runtime for scores")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable); none by default")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("explore", help="describe a dataset: counts, samples, sizes, duplicates, patients",
                       formatter_class=_Formatter)
    p.add_argument("--data", required=True, help="dataset root or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=8, help="sample images per class in samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_explore)

    add_train(sub)

    p = sub.add_parser("evaluate", help="measure a model on labelled images (metrics with 95%% CIs, plots)",
                       formatter_class=_Formatter,
                       description="Writes OUT/metrics.json (with stratified-bootstrap 95% CIs, Brier score, "
                       "ECE and recall per pneumonia subtype), OUT/predictions.csv and plots (ROC, PR, "
                       "reliability), OUT/errors.csv with Grad-CAM galleries of the most confident mistakes in "
                       "OUT/errors/, and with --report one self-contained OUT/report.html. The threshold is the "
                       "one stored in the model (chosen on validation data) unless --threshold overrides it.")
    p.add_argument("--model", help="model.pt from a training run [the bundled model]")
    p.add_argument("--data", required=True, help="dataset root (its test/ split is used) or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", help="which split to evaluate when DIR has several [test]")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--errors", type=int, default=16, metavar="K",
                   help="explain the K most confident false positives and false negatives in OUT/errors/ (0 = off)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for the errors")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html, one self-contained page")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score new images; CSV of probabilities", formatter_class=_Formatter)
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here instead of stdout")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--engine", choices=["auto", "onnx", "torch"], default="auto",
                   help="runtime: auto = ONNX Runtime through a cached export (PyTorch if export fails)")
    p.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM overlay PNG per image to DIR")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for --explain")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM overlays: where in each X-ray the PNEUMONIA score came from",
                       formatter_class=_Formatter,
                       description="Writes one PNG per image: the X-ray beside its heat map, titled with "
                       "P(PNEUMONIA) and the predicted label. Warm regions raised the PNEUMONIA score; each "
                       "map is scaled to its own maximum. Maps are coarse and are not a localisation of disease.")
    p.add_argument("--model", help="model.pt [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="gradcam, gradcam++ or eigencam")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold for the label")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compare", help="table of several runs' configs and metrics, best validation ROC-AUC first",
                       formatter_class=_Formatter,
                       description="Prints a markdown table of each run's configuration (backbone, head, "
                       "augmentation, unfrozen blocks, weights, epochs, seconds per epoch) and its validation "
                       "and test metrics with 95% CIs, sorted by validation ROC-AUC. A folder without model.pt "
                       "is searched one level down, so 'compare runs/' works.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or folders of run folders)")
    p.add_argument("--out", help="also write compare.md and compare.csv (every column, CIs included) here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("experiments", help="train a grid of variants x seeds, tracked in MLflow, mean ± sd table",
                       formatter_class=_Formatter,
                       description="Trains every named run of a grid file on each seed (run folders "
                       "OUT/<name>-s<seed>, one shared feature cache), tracks each in MLflow and writes "
                       "OUT/comparison.md and .csv: mean ± sd over seeds of validation and test metrics, "
                       "best mean validation ROC-AUC first. See experiments/*.yaml for the grid format. "
                       "Needs: pip install 'pneumoscan[tracking]'.")
    p.add_argument("--grid", required=True, help="grid YAML: base: (a config), seeds: [...], runs: [{name: ..., ...}]")
    p.add_argument("--seeds", type=int, help="train N consecutive seeds from the grid's first [the grid's seeds]")
    p.add_argument("--data", help="dataset root, overriding the grid's base data.root")
    p.add_argument("--out", help="output folder [BASE_OUT_DIR/<grid name>]")
    p.add_argument("--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db]")
    p.set_defaults(func=cmd_experiments)

    p = sub.add_parser("export", help="export a model to ONNX (optionally INT8), checked against PyTorch",
                       formatter_class=_Formatter,
                       description="Writes an ONNX model whose metadata carries the model's meta (input size,\n"
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

    add_serve(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
