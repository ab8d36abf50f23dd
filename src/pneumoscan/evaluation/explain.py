"""Grad-CAM explanations: which part of an X-ray moved the PNEUMONIA logit.

Maps come from the ``grad-cam`` library (pytorch_grad_cam), not a hand-written CAM, at the layer
each backbone declares in ``backbones.BACKBONES[name].cam_layer`` (for a ``models.Ensemble``, every
member's layer: the library scales each member's map to [0, 1] and averages them). The Classifier returns one logit
per image, shaped (N,), while the library expects (N, classes); a thin wrapper adds the class
axis and the target is column 0, the PNEUMONIA logit. A hot region is therefore evidence *for*
pneumonia, whatever the prediction was, which is what a reader checking a false negative wants to
see (did the model look at the opacity at all?).

Grad-CAM needs gradients at the target layer, which a frozen backbone (``requires_grad=False``)
and ``torch.inference_mode`` never produce. ``CamExplainer`` computes the maps on a float32 copy
of the model, so the caller's model is left exactly as it was, and makes only the target layer's
activations require gradients: the backward pass then runs from the logit to that layer and no
further, with no weight gradients at all, which gives the same maps as a fully trainable copy at
a fraction of the cost. One explainer is built per model and reused (the service keeps one for
its lifetime, a folder reuses one across batches): copying the model and hooking the layer cost
more than a map of one image.

Maps are computed with one torch thread by default: at batch 1 on two shared cores, two torch
threads were ~16x slower than one (benchmarks/inference.py), because the threads wait on each
other and on whatever else runs on the cores.

Scale. The library scales every map to its own [0, 1] range (``compute_cams`` returns those
*relative* maps), so a NORMAL image at P = 0.001 shows a full-red blob that reads as "pneumonia
here". Raw activations are not returned by the library, and a fixed raw reference would differ
between layers and models, so the drawn maps use a scale anyone can check instead:

* ``absolute`` (the default for ``explain`` / ``predict --explain`` and the service): the relative
  map times the image's P(PNEUMONIA). The brightest colour of a map *is* its probability, so a
  low score looks low (dark blue everywhere at 0.1 %) and colours mean the same on every image:
  red only where a confident PNEUMONIA score came from.
* ``relative``: the map as the library scales it, to this image's own maximum; *where*, not *how
  strongly*. The error galleries use it, because a false negative at P = 0.02 would otherwise be
  invisible, and the reader checking it wants to see where the model looked at all.

Every PNG names its scale under the overlay and on its colour bar; the API returns it as
``cam_scale``. A *flat* map (no region raised the PNEUMONIA logit, or the model produced NaNs) is
drawn as the bare X-ray with the sentence ``FLAT_TEXT`` instead of a blue wash (``cam_flat``).

Where the mass lies (``mass_fractions``). Hot spots on the "R" marker, the corners, the shoulders
or outside the chest are shortcuts, not pathology. Each map reports the share of its mass (sum of
the relative map) that falls outside a fixed lung-field mask, ``cam_outside_lungs``, and inside a
border band of ``BORDER`` (8 %) of each side, ``cam_on_border``. The mask is a heuristic, not a
segmentation: two ellipses in normalised coordinates (``LUNG_FIELDS``) drawn around the two dark
lung fields of the mean of 400 training images (data/chest_xray/train, resized to 32 x 32; the
fields span about x 0.15-0.43 and 0.57-0.86, y 0.15-0.80). It is generous, so a large share
outside it (over ``OUTSIDE_ALERT``) is worth a look, a small one proves nothing. A flat map has no
mass; its fractions are None.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.modeling import artifact, backbones, models
from pneumoscan.io import data, imaging
from pneumoscan.core import metrics
from pneumoscan.evaluation import plots
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.safety.decision import UNSURE, unsure_band
from pneumoscan.inference.torch_model import as_batch, predict_logits
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import write_csv

log = logging.getLogger(__name__)

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
DISPLAY_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}
_FLAT = 1e-6  # a map whose range is below this carries no location: shown as zeros

SCALES = {"relative": "relative: scaled to this image's maximum",
          "absolute": f"absolute: this image's maximum = P({CLASS_NAMES[1]})"}
FLAT_TEXT = f"flat map: no region raised the {CLASS_NAMES[1]} score"
BORDER = 0.08  # border band, as a share of each side
# (centre x, centre y, half-width, half-height) in [0, 1] image coordinates; see the module docstring
LUNG_FIELDS = ((0.29, 0.475, 0.145, 0.325), (0.715, 0.475, 0.145, 0.325))
OUTSIDE_ALERT = 0.5  # a map with more than this share outside the lungs / on the border is listed


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


def is_flat(cam: np.ndarray) -> bool:
    """True for a map that carries no location (``compute_cams`` returns those as zeros)."""
    cam = np.asarray(cam, dtype=np.float64)
    return not np.isfinite(cam).all() or float(cam.max() - cam.min()) < _FLAT


def lung_field_mask(height: int, width: int) -> np.ndarray:
    """bool (H, W): True inside the two fixed lung-field ellipses (LUNG_FIELDS)."""
    y, x = np.mgrid[0:height, 0:width]
    y, x = (y + 0.5) / height, (x + 0.5) / width
    inside = np.zeros((height, width), dtype=bool)
    for cx, cy, rx, ry in LUNG_FIELDS:
        inside |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    return inside


def border_mask(height: int, width: int, band: float = BORDER) -> np.ndarray:
    """bool (H, W): True within ``band`` of the side's length from any edge."""
    by, bx = max(1, round(band * height)), max(1, round(band * width))
    mask = np.ones((height, width), dtype=bool)
    mask[by:height - by, bx:width - bx] = False
    return mask


def mass_fractions(cam: np.ndarray) -> tuple[float | None, float | None]:
    """(share of the map's mass outside the lung fields, share on the border); (None, None) when flat.

    Scale-free: the same for a relative map and its probability-weighted version.
    """
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, None)
    total = float(cam.sum())
    if is_flat(cam) or total <= 0:
        return None, None
    h, w = cam.shape
    outside = float(cam[~lung_field_mask(h, w)].sum()) / total
    border = float(cam[border_mask(h, w)].sum()) / total
    return round(outside, 4), round(border, 4)


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise UserError(f"unknown map scale {scale!r}; valid: {', '.join(SCALES)}")
    return scale


def scale_cam(cam: np.ndarray, prob: float | None, scale: str = "absolute") -> np.ndarray:
    """A relative map (``compute_cams``) on ``scale``: unchanged, or times P(PNEUMONIA)."""
    check_scale(scale)
    cam = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    if scale == "relative":
        return cam
    if prob is None or not np.isfinite(prob):
        raise ValueError("the absolute scale needs the image's probability")
    return cam * np.float32(min(max(float(prob), 0.0), 1.0))


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


class _WithClassAxis(nn.Module):
    """(N,) logits -> (N, 1), the shape pytorch_grad_cam's targets index into."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(1)


def cam_layer(model: nn.Module, architecture: str) -> nn.Module:
    """The module whose activations are explained, as the backbone registry declares it."""
    return model.get_submodule(backbones.backbone(architecture).cam_layer)


def cam_layers(model: nn.Module, architecture: str) -> list[nn.Module]:
    """The modules whose activations are explained: the backbone's layer, or for an ensemble
    every member's (``models.cam_layer_paths``). The library scales each layer's map to [0, 1]
    before averaging them, so every member has an equal say in where the map is hot."""
    if not isinstance(model, models.Ensemble):
        return [cam_layer(model, architecture)]
    return [model.get_submodule(path) for path in models.cam_layer_paths(model, architecture)]


def _activations_need_grad(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the target layer's output becomes a leaf that requires gradients, so the
    CAM library's gradient hook fires while nothing before the layer is differentiated."""
    return output if output.requires_grad else output.detach().requires_grad_(True)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


class CamExplainer:
    """Raw CAMs (float32 (N, H, W), as the library returns them) for uint8 images, from one
    frozen float32 copy of ``model`` and one CAM object, reusable across calls and threads (calls
    take turns). ``close()`` (or ``with``) removes the hooks from the copy."""

    def __init__(self, model: nn.Module, architecture: str, method: str = "gradcam", *, threads: int | None = 1):
        check_method(method)
        self.method, self.threads = method, threads
        self._lock = threading.Lock()
        # inference_mode(False): a model built under inference_mode would otherwise copy to tensors autograd refuses
        with torch.inference_mode(False):
            self.net = copy.deepcopy(model).float().eval().requires_grad_(False)
        layers = cam_layers(self.net, architecture)
        # before the library's own hooks
        self._hooks = [layer.register_forward_hook(_activations_need_grad) for layer in layers]
        self.cam = METHODS[method](model=_WithClassAxis(self.net), target_layers=layers)

    def __call__(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        cams = np.zeros(images.shape, dtype=np.float32)
        with self._lock, torch_threads(self.threads), torch.inference_mode(False), torch.enable_grad():
            for s in range(0, len(images), batch_size):
                batch = as_batch(images[s:s + batch_size])
                cams[s:s + len(batch)] = self.cam(input_tensor=batch, targets=[ClassifierOutputTarget(0)] * len(batch))
        return cams

    def close(self) -> None:
        self.cam.activations_and_grads.release()
        for hook in self._hooks:
            hook.remove()

    def __enter__(self) -> "CamExplainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown explanation method {method!r}; valid: {', '.join(METHODS)}")
    return method


def compute_cams(model: nn.Module, architecture: str, images: np.ndarray, method: str = "gradcam",
                 batch_size: int = 16, *, explainer: CamExplainer | None = None) -> np.ndarray:
    """Heat maps for uint8 images (N, H, W): float32 (N, H, W) in [0, 1], one per image.

    Each map is scaled to its own maximum, so maps show *where*, not *how strongly*, and are not
    comparable in height between images. A map that is flat or not finite (nothing in the layer
    raised the logit, or the model produced NaNs) is returned as zeros and logged, so an overlay
    never shows noise stretched to full contrast.

    ``explainer``: a ``CamExplainer`` of this model and method to reuse (then ``model``,
    ``architecture`` and ``method`` are its); by default one is made for this call.
    """
    method = explainer.method if explainer is not None else check_method(method)
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    cams = np.zeros(images.shape, dtype=np.float32)
    if not len(images):
        return cams
    if explainer is None:
        with CamExplainer(model, architecture, method) as fresh:
            cams[:] = fresh(images, batch_size)
    else:
        cams[:] = explainer(images, batch_size)
    flat = ~np.isfinite(cams).all(axis=(1, 2))
    flat |= np.nan_to_num(cams.max(axis=(1, 2)) - cams.min(axis=(1, 2)), nan=0.0) < _FLAT
    if flat.any():
        log.info("%s: %d of %d maps are flat or not finite (no region raised the %s logit); shown as zeros",
                 method, int(flat.sum()), len(images), CLASS_NAMES[1])
        cams[flat] = 0.0
    return np.clip(cams, 0.0, 1.0)


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
