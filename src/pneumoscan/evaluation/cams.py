"""Grad-CAM maps: which part of an X-ray moved the PNEUMONIA logit, and where their mass lies.

The maps and their maths live here; drawing them (overlays, figures, the error galleries and
``explain_files``) is ``evaluation.explain``.

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
import logging
import threading

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.modeling import backbones, models
from pneumoscan.inference.torch_model import as_batch
from pneumoscan.core.errors import UserError

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
