"""A quick look at the bundled model's input checks on proxies we make ourselves.

    PYTHONPATH=src python benchmarks/ood_check.py [--model M] [--run RUN] [--json OUT]

Non-radiographs (scikit-image's bundled photos), wrong-study proxies (validation films rotated 90°,
upside down, inverted), the validation films themselves and the same films under one or two random
acquisition shifts (``shifts.random_shift``). ``--run`` is the run folder whose manifest names the
validation films; without it the split is re-made from the model's own config (data root, validation
fraction, seed: ``data.assign_validation``, as training carved it), so the bundled model's numbers
can be re-measured without its run folder:

    PYTHONPATH=src python benchmarks/ood_check.py --model src/pneumoscan/assets/model.pt \
        --json benchmarks/ood_check.json

Prints the NOT_ASSESSED and any-flag rates.
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


def validation_split(meta, run: str | None) -> list[data.Sample]:
    """The run's manifest, or the split training carved from the model's config (root relative to
    the working directory, as training resolved it)."""
    if run:
        return data.read_manifest(Path(run) / "manifest.csv")
    cfg = meta.config or {}
    dc = cfg.get("data") or {}
    seed = (cfg.get("train") or {}).get("seed", (cfg.get("ensemble") or {}).get("seed", 42))
    if not dc.get("root") or not Path(dc["root"]).is_dir():
        raise SystemExit(f"the model's data root {dc.get('root')!r} is not here: pass --run RUN")
    return data.assign_validation(data.scan(dc["root"]), val_fraction=dc.get("val_fraction", 0.1),
                                  min_val_images=dc.get("min_val_images", 100), seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model.pt or .onnx [the bundled model]")
    p.add_argument("--run", help="run folder with manifest.csv (its val rows are used) [the split re-made from "
                                 "the model's config]")
    p.add_argument("--json", type=Path, help="also write the rates here, e.g. benchmarks/ood_check.json")
    args = p.parse_args()
    engine = load_engine(args.model)
    size = engine.meta.image_size
    val = [s for s in validation_split(engine.meta, args.run) if s.split == "val"]
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
