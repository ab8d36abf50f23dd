"""A quick look at the bundled model's input checks on proxies we make ourselves.

    PYTHONPATH=src python benchmarks/ood_check.py [--model M] [--run RUN]

Non-radiographs (scikit-image's bundled photos), wrong-study proxies (validation films rotated 90°,
upside down, inverted), the validation films themselves and the same films under one or two random
acquisition shifts (``shifts.random_shift``). ``--run`` is the run folder whose manifest names the
validation films (default: the model's own folder). Prints the NOT_ASSESSED and any-flag rates.
The validation films took part in calibration and in choosing the cut-offs: their rate is the
design's, not a measurement on unseen patients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import skimage.data as sd
from PIL import Image

from pneumoscan.io import data
from pneumoscan.modeling import shifts
from pneumoscan.safety import decision
from pneumoscan.inference.loading import load_engine

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "text", "page", "coins", "horse", "moon", "rocket", "clock",
          "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "cat")


def gray(a: np.ndarray, size: int) -> np.ndarray:
    a = np.asarray(a)
    a = (a * 255).astype(np.uint8) if a.dtype != np.uint8 else a
    img = Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("L")
    return np.asarray(img.resize((size, size)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model.pt or .onnx [the bundled model]")
    p.add_argument("--run", required=True, help="run folder with manifest.csv (its val rows are used)")
    p.add_argument("--json", type=Path, help="also write the rates here, e.g. benchmarks/ood_check.json")
    args = p.parse_args()
    engine = load_engine(args.model)
    size = engine.meta.image_size
    val = [s for s in data.read_manifest(Path(args.run) / "manifest.csv") if s.split == "val"]
    _, films, _ = data.load_images(val, size)
    rng = np.random.default_rng(0)
    sets = {"non-radiographs (scikit-image photos)": np.stack([gray(getattr(sd, n)(), size) for n in PHOTOS]),
            "films rotated 90 degrees": np.rot90(films, 1, axes=(1, 2)).copy(),
            "films upside down": films[:, ::-1].copy(), "inverted films": 255 - films,
            "validation films": films,
            "validation films, random acquisition shifts": np.stack([shifts.random_shift(a, rng) for a in films])}
    print(f"model {engine.path} ({engine.sha256[:12]}), {engine.name}")
    rates = {}
    for name, images in sets.items():
        verdicts = decision.assess(engine, images, [(size, size)] * len(images))
        na = float(np.mean([not v.assessed for v in verdicts]))
        flagged = float(np.mean([bool(v.flags) for v in verdicts]))
        rates[name] = {"n": len(images), "not_assessed": na, "any_flag": flagged}
        print(f"{name}: n={len(images)}, NOT_ASSESSED {na:.1%}, any flag {flagged:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"model_sha256": engine.sha256, "rates": rates}, indent=1) + "\n")


if __name__ == "__main__":
    main()
