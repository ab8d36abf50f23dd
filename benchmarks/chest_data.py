"""The image groups of the chest-film detector, their fixed fit / calibrate / report parts, and
the bundled model's features of them (cached in .cache/chest/).

    nice -n 10 env PYTHONPATH=src python benchmarks/chest_data.py [--data ../shared/data]

Why a fixed rule and not a random split: the report part must stay the same however often the
detector is refitted, so nothing fitted or tuned ever sees it. The rule (``part``):

* ``other_radiographs``: bucket = int(sha256(relative path)[:8], 16) % 10; buckets 0-5 fit, 6-7
  calibrate (the cut-off), 8-9 report.
* ``adult_cxr_normal``: the same buckets, 0-3 fit, 4-5 calibrate, 8-9 report; 6-7 are left unused
  (CPU time on two shared cores: every image costs two backbone passes).
* children (``chest_xray/train``): the report part is the bundled model's own *validation*
  split (522 films, re-made from its config as ``tools/add_ood.py`` does); fit and calibrate come
  from its training split only (other patients): int(sha256(patient id)[:8], 16) % 20 = 0 fit,
  = 1 calibrate, the rest unused here (CPU again; a linear detector needs no more).
* generated non-radiographs (``negatives``): seeds 0 (fit), 1 (calibrate), 2 (report).

Each cached group holds the model's pooled ``embed`` features (the frozen ImageNet backbones of
the ensemble: generic image features), its logit, its Mahalanobis score and whether the quality
gate failed, so the detector and the report never run a backbone again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "chest"
DATA = ROOT.parent / "shared" / "data"
log = logging.getLogger("chest_data")


def bucket(key: str, n: int = 10) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n


def part(key: str, fit_up_to: int = 5) -> str | None:
    """fit / calibrate / report (None: unused) for a file of the adult or other-radiograph folders."""
    b = bucket(key)
    return ("fit" if b <= fit_up_to else "calibrate" if b <= fit_up_to + 2 else "report" if b >= 8 else None)


def child_part(patient: str) -> str | None:
    b = bucket(patient, 20)
    return "fit" if b == 0 else "calibrate" if b == 1 else None


def folder_files(root: Path, fit_up_to: int = 5) -> list[tuple[str, str, str]]:
    """(relative path, group, part) of every used image under a shared folder; group = first folder."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
            rel = p.relative_to(root).as_posix()
            if (which := part(rel, fit_up_to)) is not None:
                out.append((rel, rel.split("/")[0], which))
    return out


def child_files(data: Path) -> list[tuple[str, str, str]]:
    """Children's films: the model's validation split (report) and hashed training patients."""
    from pneumoscan.core.config import RunConfig
    from pneumoscan.modeling import artifact
    from pneumoscan.training import train

    meta = artifact.read_meta(artifact.BUNDLED_MODEL)
    member = meta.members[0].config  # every member was trained on the same split (its card says so)
    config = RunConfig.from_dict(member | {"data": member["data"] | {"root": str(data / "chest_xray")}})
    out = []
    for s in train.split_samples(config, None):
        rel = Path(s.path).relative_to(data / "chest_xray").as_posix()
        p = "report" if s.split == "val" else child_part(s.patient) if s.split == "train" else None
        if p is not None:
            out.append((rel, f"children_{meta.class_names[s.label].lower()}", p))
    return out


def negatives(seed: int, n: int = 48) -> list[np.ndarray]:
    """Non-radiographs we make: noise, gradients, shapes, gratings (benchmarks/ood.py's), text pages,
    colour 'photos' of smooth blobs, and scikit-learn's / matplotlib's sample photos (report seed only
    for those, so the report holds sources the fit never saw)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ood as proxies
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = list(proxies.synthetic(n // 2, rng).images)
    for i in range(n - len(images)):  # documents: lines of glyph-like marks on paper
        w, h = int(rng.integers(300, 900)), int(rng.integers(300, 1200))
        img = Image.new("L", (w, h), int(rng.integers(200, 256)))
        d = ImageDraw.Draw(img)
        y = int(rng.integers(10, 60))
        while y < h - 20:
            d.text((int(rng.integers(5, 60)), y), "".join(chr(int(c)) for c in rng.integers(33, 126, 60)),
                   fill=int(rng.integers(0, 80)))
            y += int(rng.integers(12, 30))
        images.append(np.asarray(img))
    if seed == 2:
        for src in (proxies.sklearn_sources(), proxies.matplotlib_sources()):
            images += list(src.values())
    return [np.ascontiguousarray(a) for a in images]


def _embed(model, pixels: np.ndarray, torch) -> tuple[np.ndarray, ...]:
    from pneumoscan.inference.torch_model import as_batch

    with torch.inference_mode():  # channels-last: ~2x faster convolutions on CPU, same numbers
        f = model.embed(as_batch(pixels).contiguous(memory_format=torch.channels_last))
        return f.numpy(), model.classify(f).numpy(), model.ood_head(f).numpy()


def extract(name: str, pictures: list[tuple[np.ndarray, tuple[int, int]]], keys: list[str], groups: list[str],
            parts: list[str], model, torch) -> None:
    from pneumoscan.safety import gate

    out = CACHE / f"{name}.npz"
    if out.exists():
        return
    feats, logits, scores = [], [], []
    pixels = np.stack([p for p, _ in pictures])
    for s in range(0, len(pixels), 32):
        f, z, d = _embed(model, pixels[s:s + 32], torch)
        feats.append(f), logits.append(z), scores.append(d)
        log.info("%s: %d/%d", name, min(s + 32, len(pixels)), len(pixels))
    failed = np.array([bool(gate.check_quality(p, size)) for p, size in pictures])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(out, features=np.concatenate(feats).astype(np.float32), logit=np.concatenate(logits),
             ood=np.concatenate(scores), gate_failed=failed, key=np.array(keys), group=np.array(groups),
             part=np.array(parts))
    log.info("%s: %d images", name, len(keys))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", default="other,adult,children,negatives",
                    help="comma-separated groups to extract (two processes may share the work)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from pneumoscan.io import imaging
    from pneumoscan.modeling import artifact

    torch.set_num_threads(1)
    model, meta = artifact.load(None)
    model.eval()
    t0 = time.time()
    model.to(memory_format=torch.channels_last)
    for name, files, base in (("other", folder_files(args.data / "other_radiographs"), args.data / "other_radiographs"),
                              ("adult", folder_files(args.data / "adult_cxr_normal", 3), args.data / "adult_cxr_normal"),
                              ("children", child_files(args.data), args.data / "chest_xray")):
        if name not in only:
            continue
        pics = [imaging.read(base / rel, meta.image_size) for rel, _, _ in files]
        extract(name, [(p.pixels, (p.width, p.height)) for p in pics], *map(list, zip(*files)), model, torch)
    for seed, p in ((0, "fit"), (1, "calibrate"), (2, "report")) if "negatives" in only else ():
        raw = negatives(seed)
        pics = [imaging.read_bytes(_png(a), meta.image_size) for a in raw]
        extract(f"negatives_{p}", [(q.pixels, (q.width, q.height)) for q in pics], [f"gen{seed}-{i}" for i in range(len(raw))],
                ["generated_non_radiographs"] * len(raw), [p] * len(raw), model, torch)
    log.info("done in %.0f s", time.time() - t0)
    return 0


def _png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
