"""Build the 200-image demo dataset in examples/chest_xray_sample from the Kaggle training split.

The committed sample was made with::

    PYTHONPATH=src python examples/make_sample.py \
        --source /work/shared/data/chest_xray/train --out examples/chest_xray_sample --seed 0

Files are copied byte for byte (the source is the 224x224 JPEG copy of Kaggle's
"chest-xray-pneumonia" train split). Selection, all driven by ``--seed``:

* quotas: train 70 NORMAL + 90 PNEUMONIA, test 15 NORMAL + 25 PNEUMONIA; the PNEUMONIA quota
  is split 2:1 bacteria:virus, about the ratio in the full training split;
* patient-grouped: each patient (``pneumoscan.data.patient_id``) gives at most one image, so no
  patient is in both train and test and exact duplicates (always one patient's) cannot occur;
* per stratum, patients are shuffled and test is filled before train.

The sample is for demos and tests only; 200 images are far too few to judge a model.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path

from pneumoscan.data import patient_id
from pneumoscan.imaging import IMAGE_SUFFIXES

log = logging.getLogger("make_sample")

# (class folder, file-name keyword or "" for any) -> images per split
QUOTAS: dict[tuple[str, str], dict[str, int]] = {
    ("NORMAL", ""): {"test": 15, "train": 70},
    ("PNEUMONIA", "bacteria"): {"test": 17, "train": 60},
    ("PNEUMONIA", "virus"): {"test": 8, "train": 30},
}


def select(source: Path, seed: int) -> dict[str, list[tuple[Path, str]]]:
    """(file, class name) per split; deterministic for a given source listing and seed."""
    rng = random.Random(seed)
    used: set[str] = set()
    chosen: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for (class_name, keyword), quota in QUOTAS.items():
        files = sorted(p for p in (source / class_name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and keyword in p.name.lower())
        by_patient: dict[str, list[Path]] = defaultdict(list)
        for p in files:
            by_patient[patient_id(p.name)].append(p)
        patients = sorted(set(by_patient) - used)
        rng.shuffle(patients)
        need = sum(quota.values())
        if len(patients) < need:
            what = keyword or class_name
            raise SystemExit(f"{source / class_name}: need {need} {what} patients, found {len(patients)}")
        picked = iter(patients[:need])
        for split, n in quota.items():
            for patient in (next(picked) for _ in range(n)):
                chosen[split].append((rng.choice(by_patient[patient]), class_name))
                used.add(patient)
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="folder holding NORMAL/ and PNEUMONIA/ (Kaggle train/), or the dataset root above it")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "chest_xray_sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    source = args.source / "train" if (args.source / "train").is_dir() else args.source
    existing = [args.out / split for split in ("train", "test") if (args.out / split).exists()]
    if existing:
        raise SystemExit(f"{', '.join(map(str, existing))} already exist; remove them to rebuild the sample")

    for split, items in select(source, args.seed).items():
        for src, class_name in items:
            dst = args.out / split / class_name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        log.info("%s: %d images", split, len(items))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    log.info("wrote %s (%.2f MB of images)", args.out, total / 1e6)


if __name__ == "__main__":
    main()
