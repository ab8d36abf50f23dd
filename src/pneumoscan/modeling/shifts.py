"""Acquisition shifts of a chest film (numpy + Pillow), for fitting the OOD detector.

Films from other hospitals differ in exposure curve, contrast, sharpness, noise, compression,
collimation borders, positioning and burned-in annotations. A Mahalanobis detector fitted on one
archive's films alone treats each of these as "far" (18.5% of mildly shifted held-out films were
flagged); fitting its covariance on the training films *plus* ``shifted_views`` of them brought
that to 1.7% while wrong studies were still detected (``benchmarks/ood.md``). Geometry that
changes what the film *is* (90-degree rotations, flips upside-down, inversion) is deliberately
absent: those are the wrong studies the detector must keep flagging.

Every function takes and returns a uint8 (H, W) array of the same shape.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def gamma(a: np.ndarray, g: float) -> np.ndarray:
    return (255 * (a / 255.0) ** g).round().astype(np.uint8)


def contrast(a: np.ndarray, c: float, b: float = 0.0) -> np.ndarray:
    m = a.mean()
    return np.clip((a - m) * c + m + b, 0, 255).round().astype(np.uint8)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma)))


def noise(a: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def resample(a: np.ndarray, factor: float) -> np.ndarray:
    """Down to ``factor`` of the size and back up: a film digitised at a lower resolution."""
    h, w = a.shape
    small = Image.fromarray(a).resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def zoom_out(a: np.ndarray, f: float, fill: int = 0) -> np.ndarray:
    """Shrink to ``f`` of the size inside a constant border (collimation, scanner margins)."""
    h, w = a.shape
    small = np.asarray(Image.fromarray(a).resize((int(w * f), int(h * f)), Image.Resampling.BILINEAR))
    out = np.full_like(a, fill)
    oy, ox = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return out


def burn_text(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(a.copy())
    d = ImageDraw.Draw(img)
    for txt in ("L", "AP PORTABLE", f"2024-0{rng.integers(1, 9)}-1{rng.integers(0, 9)}", "R"):
        d.text((int(rng.integers(2, 150)), int(rng.integers(2, 200))), txt, fill=255)
    return np.asarray(img)


def rotate(a: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).rotate(degrees, Image.Resampling.BILINEAR))


def crop_zoom(a: np.ndarray, frac: float, cy: float = 0.5, cx: float = 0.5) -> np.ndarray:
    """A square crop of ``frac`` of the side, resized back (bilinear, as decoding does)."""
    h, w = a.shape
    s = int(min(h, w) * frac)
    y, x = int((h - s) * cy), int((w - s) * cx)
    crop = Image.fromarray(np.ascontiguousarray(a[y:y + s, x:x + s]))
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


def random_shift(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One or two shifts of random strength, drawn from ranges a little wider than the fixed
    strengths ``benchmarks/ood.py`` tests with."""
    ops = [lambda a: gamma(a, rng.uniform(0.6, 1.7)), lambda a: contrast(a, rng.uniform(0.6, 1.4), rng.uniform(-20, 20)),
           lambda a: blur(a, rng.uniform(0.5, 2.0)), lambda a: noise(a, rng.uniform(2, 10), rng),
           lambda a: jpeg(a, int(rng.integers(10, 60))),
           lambda a: zoom_out(a, rng.uniform(0.7, 0.95), int(rng.choice([0, 255]))),
           lambda a: rotate(a, rng.uniform(-12, 12)), lambda a: burn_text(a, rng),
           lambda a: crop_zoom(a, rng.uniform(0.8, 0.95))]
    for j in rng.choice(len(ops), int(rng.integers(1, 3)), replace=False):
        a = ops[j](a)
    return a


def shifted_views(images: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shifted copies of randomly chosen images (N, H, W) uint8, and which image each came
    from (so the caller can give them their source's label)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), n, replace=n > len(images))
    return np.stack([random_shift(images[i], rng) for i in idx]), idx
