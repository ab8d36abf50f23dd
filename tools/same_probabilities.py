"""Show that two model files give the same pneumonia probabilities on the example films.

    PYTHONPATH=src python tools/same_probabilities.py OLD.pt|OLD.onnx NEW.pt|NEW.onnx [--tolerance 1e-6]
    git show main:src/pneumoscan/assets/model.pt > /tmp/old.pt   # e.g. the bundled model before an edit

Compares ``Engine.model_proba`` (the graph's probability, without a site's prior offset, so an edit
of the meta's ``prior`` does not count) on examples/chest_xray_sample; exit status 1 when any
differs by more than the tolerance. Used after tools/add_chest_detector.py, which must not move them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pneumoscan.inference.loading import load_engine
from pneumoscan.io import imaging

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--tolerance", type=float, default=1e-6)
    args = p.parse_args()
    files = imaging.collect_files([ROOT / "examples" / "chest_xray_sample"])
    images = imaging.decode_many(files, 224, warn=False).images
    old, new = (load_engine(path, "torch" if str(path).endswith(".pt") else "onnx") for path in (args.old, args.new))
    delta = float(np.abs(old.model_proba(images) - new.model_proba(images)).max())
    print(f"{len(images)} example films: max |Δ P(PNEUMONIA)| = {delta:.2e} (tolerance {args.tolerance:.0e})")
    return 0 if delta <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
