"""Grad-CAM galleries of a cross-validation fold's out-of-fold errors: where a model looked on the
patients it never saw, when it was confidently wrong. The way to find shortcuts (text markers,
borders, devices) before a hospital does.

    python benchmarks/oof_errors.py runs/cv/finetune_radiograph/fold1 --out runs/oof-errors \
        [--model FOLD_MODEL.pt] [--data ../shared/data/chest_xray]

Reads the fold's test/predictions.csv and threshold (test/metrics.json), decodes the images from
``--data`` (the fold may have run elsewhere: files are matched by train/CLASS/name), and writes
errors.csv, the galleries in errors/, and a count of the errors by subtype (bacteria / virus /
normal) to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pneumoscan.modeling import artifact
from pneumoscan.cli import console
from pneumoscan.io import data
from pneumoscan.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fold", help="a cv fold folder (foldK) with test/predictions.csv")
    p.add_argument("--model", help="the fold's model.pt [FOLD/model.pt]")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray"))
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=16, help="errors of each kind in the galleries")
    args = p.parse_args()
    console.configure_logging(False)
    fold = Path(args.fold)
    model, meta = artifact.load(args.model or fold / "model.pt")
    threshold = json.loads((fold / "test" / "metrics.json").read_text())["threshold"]
    with open(fold / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    samples = [data.Sample(str(Path(args.data).joinpath(*Path(r["path"]).parts[-3:])), int(r["label"]),
                           data.patient_id(r["path"]), "test") for r in rows]
    kept, images, _ = data.load_images(samples, meta.image_size, strict=True)
    y = np.array([s.label for s in kept])
    prob = np.array([float(r["probability"]) for r in rows])
    evaluate.write_errors(model, meta, images, y, prob, threshold, [s.path for s in kept], args.out, k=args.k)
    wrong = (prob >= threshold) != (y == 1)
    kinds = Counter(("NORMAL" if s.label == 0 else "virus" if "virus" in s.path else "bacteria")
                    for s, w in zip(kept, wrong) if w)
    print(f"{fold}: {wrong.sum()} errors of {len(y)} at threshold {threshold:.4f}: {dict(kinds)}")
    print(f"galleries: {Path(args.out) / 'errors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
