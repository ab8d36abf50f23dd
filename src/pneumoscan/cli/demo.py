"""`make demo`: the whole flow on the 200-image sample committed in the repo, offline, in minutes.

1. explore the sample;
2. train the default recipe on its train split and evaluate on its test split (HTML report);
3. score the sample's test images with the bundled model, most suspicious first (a worklist);
4. say how to open the web page.

The sample is far too small to judge a model: the numbers printed show the outputs, not quality.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pneumoscan.modeling import artifact, models
from pneumoscan.cli import console
from pneumoscan.training import ensemble
from pneumoscan.evaluation import explore
from pneumoscan.core import calibration, files
from pneumoscan.commands import predict
from pneumoscan.core.config import apply_overrides, recipe
from pneumoscan.core.errors import UserError

log = logging.getLogger("pneumoscan.cli.demo")

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "examples" / "chest_xray_sample"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"


def pick_backbone_weights() -> str:
    """MobileNetV2's ImageNet weights: the shared file beside the checkout, else torchvision's
    (cached or downloadable), else none. The local file first, so the demo asks no network."""
    if SHARED_WEIGHTS.is_file():
        return str(SHARED_WEIGHTS)
    try:
        models.build("mobilenet_v2", weights="imagenet")
        return "imagenet"
    except UserError:
        pass
    log.info("no ImageNet weights available offline: training from random initialisation (expect weak results)")
    return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--epochs", type=int, default=None,
                        help="at most this many epochs for every member [each member recipe's own]")
    args = parser.parse_args(argv)
    console.configure_logging(False)
    out = Path(args.out).resolve()
    try:
        explore.explore(args.data, out / "explore")

        config = apply_overrides(recipe("default"), {
            "data.root": args.data, "data.val_fraction": 0.2, "model.backbone_weights": pick_backbone_weights(),
            "out_dir": str(out / "runs")})
        if args.epochs:  # every member's, overriding its recipe's
            config = apply_overrides(config, {"train.epochs": args.epochs})
        bars = console.StageBars()
        try:
            # the default recipe is an ensemble: each member, then their combination
            run = ensemble.fit(config, progress=bars, callbacks_for=console.training_callbacks)
        finally:
            bars.close()
        run_dir, test = run.run_dir, run.test.metrics

        worklist = None
        if artifact.BUNDLED_MODEL.is_file():
            rows, _ = predict.predict_files(None, [Path(args.data) / "test"])
            rows.sort(key=lambda r: -r.probability)
            worklist = files.write_csv(out / "worklist.csv", ["path", "probability", "prediction", "label"],
                                       [(r.path, f"{r.probability:.4f}", r.prediction, r.label) for r in rows])
    except UserError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return 2

    print(f"\n1. explore:  {out / 'explore' / 'summary.md'}")
    print(f"2. trained on the sample's train split: {run_dir}")
    meta = artifact.read_meta(run_dir / "model.pt")
    for m in meta.members or (meta,):
        source = (m.backbone_weights or {}).get("source", "none")
        weights = {"none": "random initialisation", "imagenet": "ImageNet weights (the backbone's own)"}.get(
            source, f"ImageNet weights: {Path(source).name}")
        print(f"   {m.config.get('name') or m.architecture}: {m.architecture}, {weights}")
    print(f"   its test split (n={test.n}, far too small to judge a model): accuracy {test.accuracy:.3f}, "
          f"ROC-AUC {test.roc_auc:.3f}, threshold {test.threshold:.3f} "
          f"({calibration.describe_rule(config.train.threshold)})")
    print(f"   report: file://{run_dir / 'report.html'}")
    if worklist:
        print(f"3. bundled model's worklist, most suspicious first: {worklist}")
        for r in rows[:5]:
            print(f"   {r.probability:.3f}  {r.label:9s}  {Path(r.path).name}")
        print("   (these sample images were part of the bundled model's training data: this shows the output, "
              "not its accuracy; see README 'Results')")
    else:
        print("3. this installation has no bundled model (src/pneumoscan/assets/model.pt); skipped the worklist")
    print("4. web page for radiologists: run `.venv/bin/pneumoscan serve` and open http://127.0.0.1:8000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
