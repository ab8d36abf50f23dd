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

DESCRIPTION = """\
pneumoscan: pneumonia detection in chest X-rays (NORMAL vs PNEUMONIA).

A screening aid and second opinion, not a diagnosis. Typical use:
  pneumoscan explore  --data chest_xray --out explore/
  pneumoscan train    --data chest_xray --backbone-weights mobilenet_v2_imagenet.pth
  pneumoscan evaluate --model runs/RUN/model.pt --data chest_xray --out eval/
  pneumoscan predict  --model runs/RUN/model.pt new_images/ --out predictions.csv

Data layout: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|jpg|png (any split may be
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
    "unfreeze_blocks": ("model", "unfreeze_blocks"),
    "epochs": ("train", "epochs"), "lr": ("train", "lr"), "backbone_lr": ("train", "backbone_lr"),
    "patience": ("train", "patience"), "seed": ("train", "seed"), "precision": ("train", "precision"),
    "threshold": ("train", "threshold"), "max_train_batches": ("train", "max_train_batches"),
    "feature_cache": ("train", "feature_cache"), "views": ("train", "views"), "cache_dir": ("train", "cache_dir"),
    "devices": ("train", "devices"), "num_nodes": ("train", "num_nodes"), "strategy": ("train", "strategy"),
    "out": (None, "out_dir"), "name": (None, "name"),
}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < --config file < explicit flags."""
    config = RunConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            config = RunConfig.from_dict(yaml.safe_load(path.read_text()) or {})
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
    print(f"run folder: {run_dir}")
    print(f"model:      {run_dir / 'model.pt'}")
    if (run_dir / "test" / "metrics.json").exists():
        print(f"test metrics: {run_dir / 'test' / 'metrics.json'}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a folder of labelled X-rays", formatter_class=_Formatter,
                       description="Train a classifier. Defaults reproduce the seed study: frozen ImageNet "
                       "MobileNetV2, its best head (Dense 64, BN, BN, Dense 32), the Keras augmentation, "
                       "balanced class weights, Adam 1e-3, early stopping on validation loss (patience 7). "
                       "Writes a run folder with config, data manifest, curves, checkpoints and model.pt.")
    d = RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (train/ and optionally val/, test/)")
    g.add_argument("--image-size", type=int, help=f"square input size in pixels [{d.data.image_size}]")
    g.add_argument("--val-fraction", type=float,
                   help=f"validation share carved from train, grouped by patient, when val/ has "
                   f"< {d.data.min_val_images} images [{d.data.val_fraction}]")
    g.add_argument("--augment", choices=["seed", "none"], help=f"training augmentation [{d.data.augment}]")
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
    g.add_argument("--unfreeze-blocks", type=int, help="train the last N backbone stages (-1 = all) [0]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"maximum epochs [{d.train.epochs}]")
    g.add_argument("--lr", type=float, help=f"head learning rate [{d.train.lr}]")
    g.add_argument("--backbone-lr", type=float, help=f"learning rate of unfrozen stages [{d.train.backbone_lr}]")
    g.add_argument("--patience", type=int, help=f"early-stopping patience in epochs [{d.train.patience}]")
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
    g.add_argument("--config", help="YAML with data/model/train sections (flags override it)")
    g.add_argument("--out", help=f"folder for run folders [{d.out_dir}]")
    g.add_argument("--name", help="run folder name [timestamp-backbone]")
    g.add_argument("--resume", metavar="RUN_FOLDER", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_train)


# --- evaluate / predict / explore --------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan import evaluate

    bars = StageBars()
    try:
        evaluate.run(args.model, args.data, args.out, threshold=args.threshold, split=args.split,
                     strict=args.strict, n_bootstrap=args.bootstrap,
                     decode_progress=lambda k: bars("decoding images", k, 0))
    finally:
        bars.close()
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscan import files, predict

    rows, skipped = predict.predict_files(args.model, args.paths, threshold=args.threshold)
    header = ["path", "probability", "prediction", "label_name"]
    table = [(r.path, f"{r.probability:.6f}", r.prediction, r.label_name) for r in rows]
    if args.out:
        files.write_csv(args.out, header, table)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(table)
    for path, reason in skipped:
        print(f"pneumoscan: skipped {reason}", file=sys.stderr)
    return 2 if skipped else 0


def cmd_explore(args: argparse.Namespace) -> int:
    from pneumoscan import explore

    explore.explore(args.data, args.out, n_samples=args.samples, seed=args.seed)
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return 0


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
                       description="Writes OUT/metrics.json (with stratified-bootstrap 95%% CIs), "
                       "OUT/predictions.csv and plots. The threshold is the one stored in the model "
                       "(chosen on validation data) unless --threshold overrides it.")
    p.add_argument("--model", required=True, help="model.pt from a training run")
    p.add_argument("--data", required=True, help="dataset root (its test/ split is used) or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", help="which split to evaluate when DIR has several [test]")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score new images; CSV of probabilities", formatter_class=_Formatter)
    p.add_argument("--model", required=True, help="model.pt")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here instead of stdout")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.set_defaults(func=cmd_predict)
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
