"""`make demo`: explore, train and evaluate on the small sample committed in the repo.

The sample (examples/chest_xray_sample, 200 images) is far too small to judge a model; the demo
shows the whole flow and where every output lands, in a few minutes on two cores, offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pneumoscan import cli, evaluate, explore, models, train
from pneumoscan.config import RunConfig
from pneumoscan.errors import UserError

log = logging.getLogger("pneumoscan.demo")

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "chest_xray_sample"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"


def pick_backbone_weights() -> str:
    """torchvision's ImageNet weights if cached or downloadable, else the shared file, else none."""
    try:
        models.build("mobilenet_v2", weights="imagenet")
        return "imagenet"
    except UserError:
        pass
    if SHARED_WEIGHTS.is_file():
        log.info("torchvision ImageNet weights unavailable offline; using %s", SHARED_WEIGHTS)
        return str(SHARED_WEIGHTS)
    log.info("no ImageNet weights available offline: training from random initialisation (expect weak results)")
    return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    cli.configure_logging(False)
    out = Path(args.out)
    try:
        explore.explore(args.data, out / "explore")
        config = RunConfig()
        config.data.root = args.data
        config.data.val_fraction = 0.2
        config.model.backbone_weights = pick_backbone_weights()
        config.train.epochs = args.epochs
        config.out_dir = str(out / "runs")
        run_dir = train.fit(config)
        result = evaluate.run(run_dir / "model.pt", args.data, out / "evaluation")
    except UserError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nexplore summary: {out / 'explore' / 'summary.md'}")
    print(f"run folder:      {run_dir}")
    print(f"evaluation:      {out / 'evaluation' / 'metrics.json'}")
    print(f"test sample:     {evaluate.summary_line(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
