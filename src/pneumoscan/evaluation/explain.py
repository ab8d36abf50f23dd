"""Grad-CAM explanations drawn: overlays, one figure per image, the error galleries, and
``explain_files`` for a folder of images.

The maps, their scales and where their mass lies are computed in ``evaluation.cams`` (its
docstring says how to read them); the names below re-exported from it are the ones callers of
this module have always used (``explain.compute_cams``, ``explain.mass_fractions``...).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.modeling import artifact
from pneumoscan.io import data, imaging
from pneumoscan.core import metrics
from pneumoscan.evaluation import plots
from pneumoscan.evaluation.cams import (  # noqa: F401 (re-exported: the names callers use)
    BORDER, DISPLAY_NAMES, FLAT_TEXT, LUNG_FIELDS, METHODS, OUTSIDE_ALERT, SCALES, CamExplainer, border_mask,
    cam_layer, cam_layers, check_method, check_scale, compute_cams, is_flat, lung_field_mask, mass_fractions,
    scale_cam, torch_threads)
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.safety.decision import UNSURE, unsure_band
from pneumoscan.inference.torch_model import predict_logits
from pneumoscan.core.files import write_csv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanation:
    """One image's explanation as the service returns it: the overlay PNG and how to read it."""

    png: bytes  # the X-ray under the scaled map, no text (the page draws its own colour bar)
    flat: bool
    scale: str  # a key of SCALES
    outside_lung_fraction: float | None  # share of the map's mass outside LUNG_FIELDS; None if flat
    border_fraction: float | None  # share inside the BORDER band; None if flat

    def fields(self) -> dict:
        """The API's names for everything but the PNG."""
        return {"cam_scale": self.scale, "cam_flat": self.flat, "cam_outside_lungs": self.outside_lung_fraction,
                "cam_on_border": self.border_fraction}


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def explanations(images: np.ndarray, cams: np.ndarray, prob: Sequence[float] | None = None,
                 scale: str | None = None) -> list[Explanation]:
    """An ``Explanation`` per image from ``compute_cams``' maps: the overlay on ``scale``
    (default: absolute when ``prob`` is given, else relative), flatness and where the mass lies."""
    scale = check_scale(scale or ("absolute" if prob is not None else "relative"))
    probs = [None] * len(cams) if prob is None else [float(p) for p in prob]
    if len(probs) != len(cams) or len(images) != len(cams):
        raise ValueError(f"{len(images)} images, {len(cams)} maps and {len(probs)} probabilities")
    out = []
    for image, cam, p in zip(images, cams, probs):
        flat = is_flat(cam)
        outside, border = mass_fractions(cam)
        shown = np.zeros_like(cam, dtype=np.float32) if flat else scale_cam(cam, p, scale)
        out.append(Explanation(_png(overlay(image, shown)), flat, scale, outside, border))
    return out


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The X-ray (uint8 (H, W)) under the heat map as an RGB uint8 (H, W, 3) picture."""
    gray = np.asarray(image, dtype=np.float32) / 255.0
    if gray.shape != cam.shape:
        raise ValueError(f"image {gray.shape} and map {cam.shape} differ in shape")
    return show_cam_on_image(np.repeat(gray[..., None], 3, axis=2), np.asarray(cam, dtype=np.float32),
                             use_rgb=True, image_weight=image_weight)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colorbar(fig: Figure, axes, scale: str) -> None:
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap="jet"), ax=axes, shrink=0.9,
                 label=f"relevance for {CLASS_NAMES[1]}\n({SCALES[scale]})")


def _draw_map(ax, image: np.ndarray, cam: np.ndarray, prob: float | None, scale: str, fontsize: str) -> bool:
    """The overlay on ``scale``, or for a flat map the bare X-ray with FLAT_TEXT; True if flat."""
    if is_flat(cam):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.text(0.5, 0.5, FLAT_TEXT.replace(": ", ":\n", 1), transform=ax.transAxes, ha="center", va="center",
                fontsize=fontsize, wrap=True, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
        return True
    ax.imshow(overlay(image, scale_cam(cam, prob, scale)))
    return False


def _mass_text(cam: np.ndarray) -> str:
    outside, border = mass_fractions(cam)
    if outside is None:
        return ""
    return f"map mass: {outside:.0%} outside lung fields, {border:.0%} on the border"


def save_explanation(image: np.ndarray, cam: np.ndarray, prob: float, label_name: str, path: str | Path,
                     title: str = "", *, method: str = "gradcam", scale: str = "absolute") -> Path:
    """One PNG: the X-ray beside its overlay on ``scale`` (named under it and on the colour bar),
    titled with the probability and the predicted label; a flat map says so instead."""
    check_scale(scale)
    fig = Figure(figsize=(7.4, 4.3), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("X-ray", fontsize="small")
    flat = _draw_map(axes[1], image, cam, prob, scale, "small")
    axes[1].set_title(f"{DISPLAY_NAMES.get(method, method)} overlay", fontsize="small")
    for ax in axes:
        _bare(ax)
    axes[1].set_xlabel(FLAT_TEXT if flat else f"{SCALES[scale]}\n{_mass_text(cam)}", fontsize="x-small")
    _colorbar(fig, axes, scale)
    heading = f"P({CLASS_NAMES[1]}) = {prob:.3f} → {label_name}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize="medium")
    return plots.save_figure(fig, path)


def save_gallery(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], captions: Sequence[str],
                 path: str | Path, title: str, n_cols: int = 4, *, scale: str = "relative",
                 prob: Sequence[float] | None = None) -> Path:
    """Overlays in a grid, one caption each: the quick look at what a set of images has in common.

    ``prob`` is needed for the absolute scale; the scale is named in the title and on the colour bar.
    """
    check_scale(scale)
    n = len(images)
    n_cols = max(1, min(n_cols, n))
    n_rows = max(1, -(-n // n_cols))
    fig = Figure(figsize=(max(2.3 * n_cols + 0.9, 5.0), 2.5 * n_rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        _bare(ax)
        if i < n:
            _draw_map(ax, images[i], cams[i], None if prob is None else float(prob[i]), scale, "x-small")
            ax.set_title(captions[i], fontsize="x-small")
    _colorbar(fig, list(axes), scale)
    fig.suptitle(f"{title}\nmaps {SCALES[scale]}", fontsize="medium")
    return plots.save_figure(fig, path)


def _shorten(name: str, limit: int = 24) -> str:
    """Keep both ends of a long file name: Kaggle names differ in the patient and the image number."""
    half = (limit - 1) // 2
    return name if len(name) <= limit else f"{name[:half]}…{name[-half:]}"


def _png_name(path: str | Path, method: str, taken: set[str]) -> str:
    """``<stem>.<method>.png``, numbered when two inputs share a stem (NORMAL/x.jpeg, PNEUMONIA/x.jpeg)."""
    stem = re.sub(r"[^\w.\-]+", "_", Path(path).stem) or "image"
    name, k = f"{stem}.{method}.png", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.{method}.png"
    taken.add(name)
    return name


EXPLANATION_COLUMNS = ["path", "png", "probability", "label", "cam_scale", "cam_flat", "cam_outside_lungs",
                       "cam_on_border"]


def _fraction(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def explain_files(model_path: str | Path, paths: Iterable[str | Path], out_dir: str | Path,
                  method: str = "gradcam", *, threshold: float | None = None,
                  batch_size: int = 16, scale: str = "absolute") -> tuple[list[Path], list[tuple[str, str]]]:
    """Write one explanation PNG per image file (folders are searched recursively), and
    ``explanations.csv`` beside them (EXPLANATION_COLUMNS: scale, flatness, where the mass lies).

    Returns (written PNGs, skipped (path, reason)); unreadable files are skipped and listed, like
    ``predict.predict_files``, so one bad file does not cost the rest. Images are handled in
    batches, so a folder of thousands never sits in memory at once.
    """
    check_method(method)
    check_scale(scale)
    model, meta = artifact.load(model_path)
    with CamExplainer(model, meta.architecture, method) as explainer:
        return _explain_batches(model, meta, explainer, imaging.collect_files(paths), Path(out_dir),
                                threshold, batch_size, scale)


def _explain_batches(model: nn.Module, meta: ModelMeta, explainer: CamExplainer, files: list[Path], out: Path,
                     threshold: float | None, batch_size: int,
                     scale: str) -> tuple[list[Path], list[tuple[str, str]]]:
    method = explainer.method
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    rows: list[tuple] = []
    taken: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        decoded = imaging.decode_many(chunk, meta.image_size, warn=False)  # returned, and in skipped.csv
        skipped += decoded.skipped
        if not decoded.kept:
            continue
        kept = [chunk[i] for i in decoded.kept]
        prob = metrics.sigmoid(meta.site_logits(predict_logits(model, decoded.images)))
        cams = compute_cams(model, meta.architecture, decoded.images, method, explainer=explainer)
        band = unsure_band(meta, threshold)
        for f, image, cam, p in zip(kept, decoded.images, cams, prob):
            label = UNSURE if band and band[0] <= p < band[1] else meta.label(float(p), threshold)
            png = save_explanation(image, cam, float(p), label, out / _png_name(f, method, taken),
                                   title=Path(f).name, method=method, scale=scale)
            written.append(png)
            outside, border = mass_fractions(cam)
            rows.append((str(f), png.name, f"{float(p):.6f}", label, scale, int(is_flat(cam)), _fraction(outside),
                         _fraction(border)))
    if rows:
        write_csv(out / "explanations.csv", EXPLANATION_COLUMNS, rows)
    if skipped:
        data.write_skipped(skipped, out / "skipped.csv")
    log.debug("wrote %d %s explanations to %s", len(written), method, out)
    return written, skipped


def error_galleries(model: nn.Module, meta: ModelMeta, images: np.ndarray, prob: np.ndarray,
                    paths: Sequence[str], selection: Mapping[str, np.ndarray], out_dir: str | Path,
                    method: str = "gradcam", *, fractions: dict[int, tuple[float | None, float | None]] | None = None,
                    scale: str = "relative") -> dict[str, Path]:
    """For each kind of error: ``<kind>.png`` (a grid, most confident first) and ``<kind>/NN_<file>.png``.

    ``selection`` maps a kind (e.g. "false_positive") to image indices, as
    ``evaluate.select_errors`` returns them; kinds without images get no files. Old overlays of a
    kind are removed first, so the folder never mixes two evaluations. Maps are drawn on the
    relative scale by default (see the module docstring); ``fractions``, when given, is filled
    with image index -> ``mass_fractions`` of its map.
    """
    check_method(method)
    out = Path(out_dir)
    names = meta.class_names
    galleries: dict[str, Path] = {}
    for kind, idx in selection.items():
        folder = out / kind
        if folder.is_dir():
            for old in folder.glob("[0-9][0-9]_*.png"):
                old.unlink()
        idx = np.asarray(idx, dtype=int)
        if not idx.size:
            (out / f"{kind}.png").unlink(missing_ok=True)
            continue
        cams = compute_cams(model, meta.architecture, images[idx], method)
        captions = []
        for rank, (i, cam) in enumerate(zip(idx, cams), start=1):
            name = Path(paths[i]).name
            predicted = names[1] if kind == "false_positive" else names[0]
            save_explanation(images[i], cam, float(prob[i]), predicted,
                             folder / f"{rank:02d}_{Path(name).stem}.png",
                             title=f"{kind.replace('_', ' ')} #{rank}: {name}", method=method, scale=scale)
            outside, border = mass_fractions(cam)
            if fractions is not None:
                fractions[int(i)] = (outside, border)
            shortcut = " ⚠" if max(outside or 0, border or 0) > OUTSIDE_ALERT else ""
            captions.append(f"#{rank} {_shorten(Path(name).stem)}\np = {prob[i]:.3f}{shortcut}")
        title = f"{kind.replace('_', ' ').capitalize()}s, most confident first ({DISPLAY_NAMES[method]})"
        galleries[kind] = save_gallery(images[idx], cams, captions, out / f"{kind}.png", title, scale=scale,
                                       prob=prob[idx])
    return galleries
