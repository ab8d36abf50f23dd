"""Benchmark: input-quality gate + out-of-distribution detector on our own proxy sets.

    PYTHONPATH=src python benchmarks/ood.py [--data ../shared/data/chest_xray] [--out benchmarks/ood.md]

What it does, on 2 CPU cores in ~10 min (features are cached in .cache/ood/):

1. Splits the training folder patient-grouped (seed 0): ~80% "fit" films, ~20% "val" films.
2. Builds proxy sets in memory (no image is written or committed):
   * in-distribution: the val films, and *shifted* val films (gamma, contrast, blur, noise, JPEG
     recompression, zoom-out with borders, burned-in text, small rotation, mirror) -- stand-ins for
     other hospitals' acquisition, which must mostly pass;
   * fit-negatives (only for the optional frontal-CXR classifier): synthetic noise / gradients /
     shapes / gratings and random views of scikit-image's bundled photos;
   * test-negatives, from other sources than the fit-negatives: scikit-learn's sample photos,
     matplotlib's sample images (incl. an MR slice), pydicom's bundled CT/MR/ultrasound/secondary
     capture test files, scikit-image's *medical/scientific* images (retina, phantom, cells, never
     used for fitting) and transformed val films as wrong-study proxies (rotated 90/180/270,
     inverted, heavy crops, one-lung crops, 2x2 collages).
3. Embeds every image with the bundled fine-tuned model and with the frozen ImageNet backbone,
   fits detectors on the fit films, picks cut-offs on the val films, and prints detection rates,
   AUROCs and false-flag rates.

These are *our* proxies, not the project's held-back sets: the numbers say whether the design
works in principle and which option is better, not what the held-back measurement will give.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pneumoscan.modeling import shifts
from pneumoscan.modeling.shifts import blur, burn_text, contrast, crop_zoom, gamma, jpeg, noise, rotate, zoom_out

SIZE = 224
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "ood"
IMAGENET_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"

log = logging.getLogger("benchmarks.ood")


# ----------------------------------------------------------------------------- image helpers


def to_gray(a: np.ndarray) -> np.ndarray:
    """Any array (float, 16-bit, RGB, RGBA) -> uint8 grayscale at its own size, like a PNG export."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    a = a.astype(np.float64)
    if a.dtype != np.uint8:
        lo, hi = np.nanpercentile(a, 0.5), np.nanpercentile(a, 99.5)
        a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1) * 255
    return np.nan_to_num(a).round().astype(np.uint8)


def resize(gray: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The model input exactly as data._decode makes it (squashed, bilinear, reducing_gap 3)."""
    img = Image.fromarray(gray)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


class ImageSet:
    """Model inputs (N, 224, 224) uint8 plus each image's size before resizing."""

    def __init__(self, name: str, group: str, kind: str, source: str) -> None:
        self.name, self.group, self.kind, self.source = name, group, kind, source
        self.images: list[np.ndarray] = []
        self.sizes: list[tuple[int, int]] = []
        self.labels: np.ndarray | None = None  # class labels, for chest films that have them

    def add(self, gray: np.ndarray) -> None:
        gray = to_gray(gray) if gray.dtype != np.uint8 or gray.ndim != 2 else gray
        self.sizes.append((gray.shape[1], gray.shape[0]))
        self.images.append(resize(gray))

    def add_resized(self, img224: np.ndarray, size: tuple[int, int] | None = None) -> None:
        self.images.append(np.asarray(img224, dtype=np.uint8))
        self.sizes.append(size or (SIZE, SIZE))

    @property
    def array(self) -> np.ndarray:
        return np.stack(self.images) if self.images else np.zeros((0, SIZE, SIZE), np.uint8)

    def __len__(self) -> int:
        return len(self.images)


def random_views(gray: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The image itself plus random crops (30-100% of each side) and flips: more views per source."""
    out = [gray]
    h, w = gray.shape[:2]
    for _ in range(n - 1):
        ch, cw = int(h * rng.uniform(0.3, 1.0)), int(w * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        v = gray[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            v = v[:, ::-1]
        out.append(np.ascontiguousarray(v))
    return out


# ----------------------------------------------------------------------------- chest transforms


SHIFTS = {  # mild acquisition / export differences: must mostly pass
    "gamma 0.7": lambda a, r: gamma(a, 0.7),
    "gamma 1.5": lambda a, r: gamma(a, 1.5),
    "contrast x0.7": lambda a, r: contrast(a, 0.7),
    "contrast x1.3 +15": lambda a, r: contrast(a, 1.3, 15),
    "blur s=1.5": lambda a, r: blur(a, 1.5),
    "noise s=8": lambda a, r: noise(a, 8, r),
    "jpeg q=15": lambda a, r: jpeg(a, 15),
    "zoom-out 0.8, black border": lambda a, r: zoom_out(a, 0.8),
    "burned-in text": lambda a, r: burn_text(a, r),
    "rotate 8 deg": lambda a, r: rotate(a, 8),
    "crop 85%": lambda a, r: crop_zoom(a, 0.85),
    "mirror": lambda a, r: np.ascontiguousarray(a[:, ::-1]),
}

WRONG_STUDY = {  # proxies for radiographs the model is not competent for
    "rotated 90": lambda a: np.ascontiguousarray(np.rot90(a, 1)),
    "rotated 270": lambda a: np.ascontiguousarray(np.rot90(a, 3)),
    "upside-down": lambda a: np.ascontiguousarray(a[::-1]),
    "inverted": lambda a: 255 - a,
    "heavy crop 35%": lambda a: crop_zoom(a, 0.35, 0.4, 0.5),
    "one lung (left half)": lambda a: resize(np.ascontiguousarray(a[20:200, 10:112])),
    "2x2 collage": lambda a: np.tile(resize(a, SIZE // 2), (2, 2)),
}


# ----------------------------------------------------------------------------- negative sources


def synthetic(n: int, rng: np.random.Generator) -> ImageSet:
    """Noise, gradients, shapes, gratings, flat fields, smooth blobs; sizes vary like uploads do."""
    s = ImageSet("synthetic", "non-CXR", "fit", "generated")
    kinds = ["uniform", "gauss", "gradient", "shapes", "grating", "flat", "blobs", "checker"]
    for i in range(n):
        k = kinds[i % len(kinds)]
        h, w = (int(rng.integers(160, 900)), int(rng.integers(160, 900)))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        if k == "uniform":
            a = rng.integers(0, 256, (h, w))
        elif k == "gauss":
            a = rng.normal(rng.uniform(60, 190), rng.uniform(10, 70), (h, w))
        elif k == "gradient":
            t = rng.uniform(0, np.pi)
            a = (np.cos(t) * xx + np.sin(t) * yy) * 255 + rng.normal(0, 3, (h, w))
        elif k == "grating":
            a = 127 + 120 * np.sin(2 * np.pi * rng.uniform(2, 40) * (xx * rng.uniform(-1, 1) + yy))
        elif k == "flat":
            a = np.full((h, w), rng.uniform(0, 255)) + rng.normal(0, rng.uniform(0, 4), (h, w))
        elif k == "checker":
            p = int(rng.integers(4, 60))
            a = ((np.mgrid[0:h, 0:w] // p).sum(0) % 2) * 255.0
        else:
            img = Image.new("L", (w, h), int(rng.integers(0, 120)))
            d = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(3, 25))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                box = [x0, y0, x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))]
                (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=int(rng.integers(0, 256)))
            if k == "blobs":
                img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(5, 25))))
            a = np.asarray(img, dtype=np.float64)
        s.add(np.clip(a, 0, 255).round().astype(np.uint8))
    return s


def skimage_images(names: list[str]) -> dict[str, np.ndarray]:
    import skimage.data as skd

    out = {}
    for n in names:
        try:
            fn = getattr(skd, n)
            out[n] = to_gray(fn(rng=0) if n == "binary_blobs" else fn())  # binary_blobs is random otherwise
        except Exception as e:  # not bundled in this version: skip, say so
            log.warning("skimage.data.%s unavailable (%s)", n, type(e).__name__)
    return out


SKIMAGE_PHOTOS = ["camera", "astronaut", "coins", "text", "page", "moon", "horse", "clock", "chelsea",
                  "coffee", "rocket", "brick", "grass", "gravel", "colorwheel", "logo", "hubble_deep_field",
                  "checkerboard"]
SKIMAGE_MEDICAL = ["retina", "shepp_logan_phantom", "microaneurysms", "cell", "immunohistochemistry",
                   "binary_blobs"]


def photo_views(name: str, sources: dict[str, np.ndarray], views: int, kind: str, group: str,
                rng: np.random.Generator, label: str) -> ImageSet:
    s = ImageSet(name, group, kind, label)
    for a in sources.values():
        for v in random_views(a, views, rng):
            s.add(v)
    return s


def dicom_sources() -> dict[str, np.ndarray]:
    """Every bundled pydicom test file with decodable pixels, as one display image per frame
    (modality + VOI LUT, min-max), i.e. what a screenshot / PNG export of it looks like."""
    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # after import: pydicom sets its own level

    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sorted(get_testdata_files("*.dcm"))
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array
            mod = str(ds.get("Modality", "?"))
        except Exception:
            continue
        frames = px if (int(ds.get("NumberOfFrames", 1) or 1) > 1) else px[None]
        for i, fr in enumerate(frames[:4]):
            if fr.ndim == 2:
                try:
                    fr = apply_voi_lut(apply_modality_lut(fr, ds), ds)
                except Exception:
                    pass
            g = to_gray(fr)
            key = hashlib.sha1(resize(g, 32).tobytes()).hexdigest()
            if key in seen or g.std() < 1:
                continue
            seen.add(key)
            out[f"{Path(f).stem}[{i}] {mod}"] = g
    return out


def matplotlib_sources() -> dict[str, np.ndarray]:
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "sample_data"
    out = {}
    for f in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"):
        out[f] = to_gray(np.asarray(Image.open(d / f)))
    with gzip.open(d / "s1045.ima.gz") as fh:  # a 256x256 16-bit MR slice of a head
        out["s1045.ima (MR)"] = to_gray(np.frombuffer(fh.read(), np.uint16).reshape(256, 256))
    for f in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        z = np.load(d / f)
        out[f] = to_gray(z[z.files[0]])
    return out


def sklearn_sources() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    return {f"sklearn {i}": to_gray(a) for i, a in enumerate(load_sample_images().images)}


# ----------------------------------------------------------------------------- features


def _extractors():
    import torch

    from pneumoscan.modeling import artifact, models

    torch.set_num_threads(2)
    tuned, _ = artifact.load(None)
    imnet, _ = models.build("mobilenet_v2", weights=str(IMAGENET_WEIGHTS), head="linear")
    imnet.eval()
    return {"finetuned": tuned, "imagenet": imnet}


def embed_all(sets: dict[str, ImageSet]) -> dict[str, dict[str, np.ndarray]]:
    """{extractor: {set name: (N, 1280) float32}}, cached by content hash of each set's images."""
    from pneumoscan.training import features

    CACHE.mkdir(parents=True, exist_ok=True)
    extractors = None
    out: dict[str, dict[str, np.ndarray]] = {"finetuned": {}, "imagenet": {}}
    for name, s in sets.items():
        arr = s.array
        digest = hashlib.sha1(arr.tobytes()).hexdigest()[:16]
        for ex in out:
            path = CACHE / f"{ex}-{digest}.npy"
            if path.is_file():
                out[ex][name] = np.load(path)
                continue
            if extractors is None:
                extractors = _extractors()
            t = time.perf_counter()
            f = features.embed(extractors[ex], arr, batch_size=64).numpy().astype(np.float32)
            log.info("embedded %-32s %5d images with %-9s in %5.1fs", name, len(arr), ex, time.perf_counter() - t)
            np.save(path, f)
            out[ex][name] = f
    return out


# ----------------------------------------------------------------------------- sets


def build_sets(data_root: Path, seed: int = 0, n_shift: int = 60, n_wrong: int = 60,
               n_aug: int = 1000) -> tuple[dict[str, ImageSet], np.ndarray]:
    from pneumoscan.io import data

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # bundled test files are deliberately odd
    warnings.filterwarnings("ignore", module="pydicom")
    rng = np.random.default_rng(seed)
    samples = data.holdout_split(data.scan(data_root), 0.2, seed, split_name="val")
    samples, images, _ = data.load_images(samples, SIZE)
    labels = np.array([s.label for s in samples])
    is_val = np.array([s.split == "val" for s in samples])

    sets: dict[str, ImageSet] = {}
    fit = ImageSet("chest fit films", "chest", "fit", "train folder, patient-grouped 80%")
    val = ImageSet("chest val films", "chest", "val", "train folder, patient-grouped 20%")
    for img, v in zip(images, is_val):
        (val if v else fit).add_resized(img)
    sets[fit.name], sets[val.name] = fit, val

    fit_imgs = images[~is_val]
    aug = ImageSet("fit-aug: shifted fit films", "chest", "fit-aug", "fit films, 1-2 random acquisition shifts")
    views, idx = shifts.shifted_views(fit_imgs, n_aug, seed + 100)  # own stream: other sets unchanged
    for v in views:
        aug.add_resized(v)
    aug.labels = labels[~is_val][idx]
    sets[aug.name] = aug

    val_imgs = images[is_val]
    pick = rng.choice(len(val_imgs), n_shift, replace=False)
    for k, f in SHIFTS.items():
        s = ImageSet(f"shifted: {k}", "shifted chest", "test", "val films")
        for i in pick:
            s.add_resized(f(val_imgs[i], rng))
        sets[s.name] = s
    pick = rng.choice(len(val_imgs), n_wrong, replace=False)
    for k, f in WRONG_STUDY.items():
        s = ImageSet(f"wrong study: {k}", "medical", "test", "val films")
        for i in pick:
            s.add_resized(f(val_imgs[i]))
        sets[s.name] = s

    # fit-negatives (frontal-CXR classifier only)
    sets["fit-neg: synthetic"] = synthetic(120, rng)
    sets["fit-neg: skimage photos"] = photo_views("fit-neg: skimage photos", skimage_images(SKIMAGE_PHOTOS), 12,
                                                  "fit", "non-CXR", rng, "skimage.data")
    # test-negatives
    sets["synthetic (test draw)"] = synthetic(80, np.random.default_rng(seed + 1))
    sets["synthetic (test draw)"].name = "synthetic (test draw)"
    sets["synthetic (test draw)"].kind = "test"
    sets["sklearn photos"] = photo_views("sklearn photos", sklearn_sources(), 40, "test", "non-CXR", rng,
                                         "sklearn.datasets")
    mpl = matplotlib_sources()
    mr = {k: v for k, v in mpl.items() if "MR" in k}
    sets["matplotlib images"] = photo_views("matplotlib images", {k: v for k, v in mpl.items() if k not in mr},
                                            15, "test", "non-CXR", rng, "matplotlib sample_data")
    dcm = dicom_sources()
    sets["pydicom CT/MR/US/SC"] = photo_views("pydicom CT/MR/US/SC", dcm | mr, 4, "test", "medical", rng,
                                              "pydicom test files + matplotlib MR")
    sets["skimage medical/science"] = photo_views("skimage medical/science", skimage_images(SKIMAGE_MEDICAL), 15,
                                                  "test", "medical", rng, "skimage.data (not in fit)")
    # degenerate uploads from the issue
    deg = ImageSet("degenerate uploads", "non-CXR", "test", "issue 11")
    for a in (np.zeros((1, 1), np.uint8) + 128, np.full((8, 4000), 200, np.uint8), np.zeros((512, 512), np.uint8),
              np.full((512, 512), 255, np.uint8), rng.integers(0, 256, (32, 32)).astype(np.uint8),
              rng.integers(0, 256, (8, 4000)).astype(np.uint8)):
        deg.add(a)
    sets[deg.name] = deg
    return sets, labels[~is_val]


# ----------------------------------------------------------------------------- evaluation


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of an OOD image > score of an in-distribution film), ties half."""
    from scipy.stats import rankdata

    r = rankdata(np.r_[neg, pos])
    return float((r[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def knn_scores(bank: np.ndarray, x: np.ndarray, k: int = 10) -> np.ndarray:
    """Sun et al. 2022: distance to the k-th nearest training film, L2-normalised features."""
    def n(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    b, out = n(bank), []
    for i in range(0, len(x), 512):
        d = 2 - 2 * n(x[i:i + 512]) @ b.T
        out.append(np.sqrt(np.maximum(np.partition(d, k - 1, axis=1)[:, k - 1], 0)))
    return np.concatenate(out)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pct(x) -> str:
    return f"{100 * float(np.mean(x)):.1f}%"


def report(sets: dict[str, ImageSet], fit_labels: np.ndarray, feats: dict, t0: float) -> int:
    from pneumoscan.safety import gate, ood

    fit_name, val_name = "chest fit films", "chest val films"
    test_sets = [n for n, s in sets.items() if s.kind == "test"]
    groups = {"shifted chest": [n for n in test_sets if sets[n].group == "shifted chest"],
              "non-CXR": [n for n in test_sets if sets[n].group == "non-CXR"],
              "medical": [n for n in test_sets if sets[n].group == "medical"]}
    fit_neg = [n for n, s in sets.items() if s.kind == "fit" and s.group != "chest"]
    aug_name = "fit-aug: shifted fit films"
    print("# OOD benchmark (benchmarks/ood.py)\n")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}\n")

    print("These are our own proxy sets, not the project's held-back sets (official test split, external adult "
          "films, real other-body-part radiographs, CT/MR/US studies): the rates show whether the design works and "
          "which option is better, not what the held-back measurement will give.\n")
    print("## Sets\n")
    print("| set | group | used for | n | source |")
    print("|---|---|---|---|---|")
    for n, s in sets.items():
        used = {"fit": "fit", "fit-aug": "fit", "val": "cut-offs"}.get(s.kind, "test only")
        print(f"| {n} | {s.group} | {used} | {len(s)} | {s.source} |")
    print()

    # --- gate limits from the fit films (the module's defaults were set from this output)
    lim, pcts = gate.fit_limits(sets[fit_name].array)
    print("## Gate limits fitted on the fit films (rule: lower = 0.5 x p0.1, upper = 2 x p99.9)\n")
    print("| statistic | min | p0.1 | p50 | p99.9 | max | fitted limit | default in gate.py |")
    print("|---|---|---|---|---|---|---|---|")
    dflt = gate.QualityLimits()
    for k, name in (("std", "min_std"), ("entropy", "min_entropy"), ("dominant_fraction", "max_dominant_fraction"),
                    ("saturated_fraction", "max_saturated_fraction"), ("roughness", "max_roughness")):
        q = pcts[k]
        print(f"| {k} | {q[0]:.3f} | {q[0.1]:.3f} | {q[50]:.3f} | {q[99.9]:.3f} | {q[100]:.3f} "
              f"| {getattr(lim, name)} | {getattr(dflt, name)} |")
    print(f"\nreasoned: min_side {dflt.min_side} px, max_aspect {dflt.max_aspect}:1\n")
    gated = {n: np.array([bool(gate.check_quality(a, sz)) for a, sz in zip(s.images, s.sizes)])
             for n, s in sets.items()}

    # --- compare detectors
    print("## Detector options (cut-off: 99.5th percentile of val-film scores)\n")
    print("Rates are the share flagged by the detector alone (no gate). AUROC: vs val films, mean over sets.\n")
    print("| features | detector | val flagged | shifted flagged | non-CXR detected | medical detected "
          "| AUROC non-CXR | AUROC medical |")
    print("|---|---|---|---|---|---|---|---|")
    choices: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    aug_name = "fit-aug: shifted fit films"
    aug_labels_ = sets[aug_name].labels
    negs = {ex: np.concatenate([feats[ex][n] for n in fit_neg]) for ex in feats}
    for ex in ("finetuned", "imagenet"):
        F = feats[ex]
        opts = {}
        for k in (32, 128, 512, None):
            st = ood.fit(F[fit_name], fit_labels, F[val_name], k=k, feature_source=ex)
            opts[f"Mahalanobis k={k or 1280}"] = (lambda x, st=st: ood.score(st, x), st)
        st = ood.fit(F[fit_name], fit_labels, F[val_name], k=None, l2_normalize=False, feature_source=ex)
        opts["Mahalanobis k=1280, raw (no L2)"] = (lambda x, st=st: ood.score(st, x), st)
        aug = np.concatenate([F[fit_name], F[aug_name]])
        aug_labels = np.r_[fit_labels, aug_labels_]
        for k in (512, None):
            st = ood.fit(aug, aug_labels, F[val_name], k=k, feature_source=ex)
            opts[f"Mahalanobis k={k or 1280}, fit + shifted fit films"] = (lambda x, st=st: ood.score(st, x), st)
        opts["kNN k=10 (Sun 2022)"] = (lambda x, b=F[fit_name]: knn_scores(b, x), None)
        st = ood.fit(F[fit_name], fit_labels, F[val_name], k=None, negatives=negs[ex], feature_source=ex)
        opts["frontal-CXR logistic (-logit)"] = (lambda x, st=st: -ood.classifier_logit(st, x), st)
        for name, (fn, st) in opts.items():
            sc = {n: fn(F[n]) for n in sets}
            cut = np.percentile(sc[val_name], 99.5)
            row = [pct(sc[val_name] > cut)]
            for g in ("shifted chest", "non-CXR", "medical"):
                row.append(pct(np.concatenate([sc[n] for n in groups[g]]) > cut))
            for g in ("non-CXR", "medical"):
                row.append(f"{np.mean([auroc(sc[val_name], sc[n]) for n in groups[g]]):.3f}")
            print(f"| {ex} | {name} | " + " | ".join(row) + " |")
            choices[(ex, name)] = {"scores": sc, "state": st}
    print()

    # --- the chosen design: cut-off sweep and per set
    for ex in ("imagenet", "finetuned"):
        F = feats[ex]
        x, y = (np.concatenate([F[fit_name], F[aug_name]]), np.r_[fit_labels, aug_labels_]) if FINAL_AUG \
            else (F[fit_name], fit_labels)
        st = ood.fit(x, y, F[val_name], k=FINAL_K, feature_source=ex)
        sweep(sets, F, st, gated, groups, val_name, ex)
        table(sets, F, st, gated, groups, val_name, ex)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s (features cached in .cache/ood/ are reused on a re-run)")
    return 0


FINAL_K = None  # all 1280 dimensions
FINAL_AUG = True  # covariance also fitted on shifted fit films


def sweep(sets, F, st, gated, groups, val_name, ex) -> None:
    """NOT_ASSESSED (gate or score above the cut-off) for candidate not_chest_xray cut-offs."""
    from pneumoscan.safety import ood

    sc = {n: ood.score(st, F[n]) for n in sets}
    p995 = np.percentile(sc[val_name], 99.5)
    cands = [(f"p{q:g} of val", np.percentile(sc[val_name], q)) for q in (99, 99.5, 99.9)]
    cands += [(f"{m:g} x p99.5", m * p995) for m in (1.25, 1.5, 2.0)]
    print(f"## Cut-off sweep: {ex} features (NOT_ASSESSED = gate or Mahalanobis > cut-off)\n")
    print("| cut-off | value | val films | shifted (pooled) | worst shift | medical | non-CXR |")
    print("|---|---|---|---|---|---|---|")
    for name, cut in cands:
        na = {n: gated[n] | (sc[n] > cut) for n in sets}
        worst = max(groups["shifted chest"], key=lambda n: na[n].mean())
        row = [pct(na[val_name])] + [pct(np.concatenate([na[n] for n in groups["shifted chest"]]))]
        row += [f"{pct(na[worst])} ({worst.split(': ')[1]})"]
        row += [pct(np.concatenate([na[n] for n in groups[g]])) for g in ("medical", "non-CXR")]
        print(f"| {name} | {cut:.0f} | " + " | ".join(row) + " |")
    print()


def table(sets, F, st, gated, groups, val_name, ex) -> None:
    from pneumoscan.safety import ood

    src = "fit + shifted fit films" if FINAL_AUG else "fit films"
    print(f"## Per set: {ex} features, Mahalanobis k={FINAL_K or 1280} (L2-normalised, fitted on {src})\n")
    print(f"cut-offs: not_chest_xray score > {st.cutoff_not_chest:.0f} (p{st.percentile:g} of val x {st.margin:g}); "
          f"out_of_distribution score > {st.cutoff_ood:.0f} (p{st.ood_percentile:g} of val)\n")
    print("| set | group | used for | n | gate | Mahalanobis not_chest | NOT_ASSESSED (gate or score) "
          "| marked out_of_distribution | AUROC (score vs val films) |")
    print("|---|---|---|---|---|---|---|---|---|")
    val_sc = ood.score(st, F[val_name])
    agg: dict[str, list[np.ndarray]] = {}
    for n, s in sets.items():
        sc = ood.score(st, F[n])
        m = sc > st.cutoff_not_chest
        na = gated[n] | m
        marked = ~na & (sc > st.cutoff_ood)
        au = "" if s.kind != "test" else f"{auroc(val_sc, sc):.3f}"
        used = {"fit": "fit", "fit-aug": "fit", "val": "cut-offs"}.get(s.kind, "test only")
        print(f"| {n} | {s.group} | {used} | {len(s)} | {pct(gated[n])} | {pct(m)} | {pct(na)} | {pct(marked)} | {au} |")
        for g, names in groups.items():
            if n in names:
                agg.setdefault(g, []).append(np.c_[gated[n], m, na, marked])
    print()
    print("| group (test sets pooled) | n | gate | Mahalanobis | NOT_ASSESSED | marked out_of_distribution |")
    print("|---|---|---|---|---|---|")
    for g, parts in agg.items():
        a = np.concatenate(parts)
        print(f"| {g} | {len(a)} | " + " | ".join(pct(a[:, i]) for i in range(4)) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    p.add_argument("--features-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    sets, fit_labels = build_sets(Path(args.data))
    log.info("built %d sets (%d images) in %.0fs", len(sets), sum(map(len, sets.values())), time.perf_counter() - t0)
    feats = embed_all(sets)
    if args.features_only:
        return 0
    return report(sets, fit_labels, feats, t0)


if __name__ == "__main__":
    sys.exit(main())
