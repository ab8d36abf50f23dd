"""Training-time augmentation.

"seed" reproduces the seed study's Keras ImageDataGenerator, so results can be compared with it:

    ImageDataGenerator(rotation_range=20, zoom_range=0.15, width_shift_range=0.2,
                       height_shift_range=0.2, shear_range=0.15, horizontal_flip=True,
                       fill_mode="nearest")

It is written as one affine sampling grid per image (``F.affine_grid`` + ``F.grid_sample``) rather
than torchvision's ``v2.RandomAffine``: that only fills with a constant, and emulating Keras'
"nearest" fill with it means edge-padding to ~2x the size first — which made augmentation, not the
network, the slowest part of training. ``padding_mode="border"`` *is* nearest fill, the whole batch
is transformed in one call, and Keras' independent x/y zoom is reproduced exactly.
Evaluation uses no transform: images are already decoded at the model's size.

"seed-noflip" drops the horizontal flip: a flipped chest film puts the heart on the right
(situs inversus is ~1 in 10,000), so the flip teaches the model anatomy it will never see.
"radiograph" is milder geometry (rotation 10°, zoom/shift 0.1, shear 0.05, no flip) plus the
intensity changes that differ between X-ray machines: contrast, brightness and gamma.

With a trainable backbone the augmentation runs on the batch after it reaches the device
(``LitClassifier.on_after_batch_transfer``), so a GPU, not the data loader, does the work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscan.modeling import shifts
from pneumoscan.core.config import AUGMENTATIONS  # declared once, with the config
from pneumoscan.core.errors import UserError

log = logging.getLogger(__name__)


class SeedAugment(torch.nn.Module):
    """Random rotation, shift, shear, zoom and horizontal flip with nearest (edge) fill, Keras-style.

    Works on one image (C, H, W) or a batch (N, C, H, W), uint8 or float; returns the same dtype.
    ``seeds`` (one per image) make each image's draw independent of what it is batched with.
    """

    def __init__(self, rotation: float = 20.0, zoom: float = 0.15, shift: float = 0.2,
                 shear: float = 0.15, hflip: bool = True, contrast: float = 0.0, brightness: float = 0.0,
                 gamma: float = 0.0):
        super().__init__()
        self.rotation, self.zoom, self.shift, self.shear, self.hflip = rotation, zoom, shift, shear, hflip
        # intensity jitter (0 = off): contrast and gamma factors in [1 - a, 1 + a], brightness offset in [-b, b]
        self.contrast, self.brightness, self.gamma = contrast, brightness, gamma

    def draw(self, n: int, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Per-image parameters (n, 7): angle, tx, ty, shear (radians / fractions), zx, zy, flip."""
        if seeds is None:
            u = torch.rand(n, 7)
        else:
            u = torch.stack([torch.rand(7, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        lo_hi = lambda r, a, b: a + (b - a) * r  # noqa: E731
        return torch.stack([
            lo_hi(u[:, 0], -1, 1) * math.radians(self.rotation),
            lo_hi(u[:, 1], -1, 1) * self.shift,
            lo_hi(u[:, 2], -1, 1) * self.shift,
            lo_hi(u[:, 3], -1, 1) * math.radians(self.shear),  # Keras' shear_range is in degrees
            lo_hi(u[:, 4], 1 - self.zoom, 1 + self.zoom),  # Keras draws x and y zoom independently
            lo_hi(u[:, 5], 1 - self.zoom, 1 + self.zoom),
            (u[:, 6] < 0.5).float() if self.hflip else torch.zeros(n),
        ], dim=1)

    @staticmethod
    def theta(params: torch.Tensor) -> torch.Tensor:
        """Output->input affine maps in normalised coordinates, composed as Keras does:
        rotation @ shift @ shear @ zoom (shifts are a fraction of the size, i.e. 2x in [-1, 1])."""
        angle, tx, ty, shear, zx, zy, flip = params.unbind(1)
        n = len(params)
        eye = lambda: torch.eye(3).repeat(n, 1, 1)  # noqa: E731
        rot, shift, sh, zoom = eye(), eye(), eye(), eye()
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        shift[:, 0, 2], shift[:, 1, 2] = 2 * tx, 2 * ty
        sh[:, 0, 1], sh[:, 1, 1] = -shear.sin(), shear.cos()
        zoom[:, 0, 0], zoom[:, 1, 1] = zx, zy
        m = rot @ shift @ sh @ zoom
        m[:, :, 0] *= 1 - 2 * flip[:, None]  # horizontal flip of the output
        return m[:, :2]

    def forward(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        single = x.dim() == 3
        batch = x.unsqueeze(0) if single else x
        params = self.draw(len(batch), seeds)
        theta = self.theta(params).to(batch.device)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.contrast or self.brightness or self.gamma:
            out = self.jitter_intensity(out, x.dtype == torch.uint8, seeds)
        if x.dtype == torch.uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out[0] if single else out


    def jitter_intensity(self, x: torch.Tensor, uint8: bool, seeds: Sequence[int] | None) -> torch.Tensor:
        """Gamma, then contrast about the image's mean, then brightness; per image, clipped to range."""
        n, scale = len(x), 255.0 if uint8 else 1.0
        if seeds is None:
            u = torch.rand(n, 3)
        else:  # a stream of its own, so the geometry drawn for a seed does not change
            u = torch.stack([torch.rand(3, generator=torch.Generator().manual_seed(int(s) + 7919)) for s in seeds])
        u = (2 * u - 1).to(x.device).view(n, 3, 1, 1, 1).unbind(1)
        x = (x / scale).clamp(0, 1) ** (1 + self.gamma * u[0])
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + self.contrast * u[1]) + mean + self.brightness * u[2]
        return x.clamp(0, 1) * scale


class AcquisitionAugment(SeedAugment):
    """"radiograph" geometry and intensity, then, for half the films, one or two degradations
    another hospital's chain adds: blur, noise, JPEG compression, a lower digitising resolution, a
    collimation or scanner border, burned-in text (``shifts``). Frozen ImageNet features call
    nearly every normal film PNEUMONIA once it is compressed, noisy or low-resolution
    (benchmarks/robustness.md); a head that has seen such films need not. Sharpening,
    letterboxing and zooming in are left out on purpose, so the shift suite keeps kinds that no
    training film had; ``framing=True`` ("acquisition-framing") adds zooming in."""

    def __init__(self, p: float = 0.5, framing: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.p, self.framing = p, framing  # framing: zooming in (a crop of 70-95%) joins the degradations

    def forward(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        out = super().forward(x, seeds)
        batch = out.unsqueeze(0) if out.dim() == 3 else out
        uint8 = batch.dtype == torch.uint8
        films = (batch if uint8 else (batch.clamp(0, 1) * 255).round()).to(torch.uint8).cpu().numpy()
        seeds = list(seeds) if seeds is not None else torch.randint(0, 2**31 - 1, (len(films),)).tolist()
        changed = False
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng([int(seed), 104729])
            if rng.random() < self.p:
                films[i, 0] = degrade(films[i, 0], rng, framing=self.framing)
                changed = True
        if not changed:
            return out
        result = torch.from_numpy(films).to(batch.device)
        result = result if uint8 else result.to(batch.dtype) / 255
        return result[0] if out.dim() == 3 else result


def degrade(a: np.ndarray, rng: np.random.Generator, *, framing: bool = False) -> np.ndarray:
    """One or two acquisition degradations of a uint8 (H, W) film, of random strength; with
    ``framing``, a tighter field of view (a crop of 70-95%, a little off-centre) is one of them."""
    ops = [lambda a: shifts.blur(a, rng.uniform(0.5, 2.0)), lambda a: shifts.noise(a, rng.uniform(2, 14), rng),
           lambda a: shifts.jpeg(a, int(rng.integers(8, 60))),
           lambda a: shifts.resample(a, rng.uniform(0.2, 0.7)),
           lambda a: shifts.zoom_out(a, rng.uniform(0.65, 0.95), int(rng.choice([0, 255]))),
           lambda a: shifts.burn_text(a, rng)]
    if framing:
        ops.append(lambda a: shifts.crop_zoom(a, rng.uniform(0.7, 0.95), *rng.uniform(0.45, 0.55, 2)))
    for j in rng.choice(len(ops), int(rng.integers(1, 3)), replace=False):
        a = ops[j](a)
    return a


PRESETS = {
    "seed": {},
    "seed-noflip": {"hflip": False},
    "radiograph": {"rotation": 10.0, "zoom": 0.1, "shift": 0.1, "shear": 0.05, "hflip": False,
                   "contrast": 0.25, "brightness": 0.1, "gamma": 0.3},
}


def train_transform(kind: str, image_size: int) -> SeedAugment | None:
    """A callable on uint8 (1, H, W) or (N, 1, H, W) tensors, or None for no augmentation."""
    if kind == "none":
        return None
    if kind in ("acquisition", "acquisition-framing"):
        return AcquisitionAugment(framing=kind == "acquisition-framing", **PRESETS["radiograph"])
    if kind not in PRESETS:
        raise UserError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    return SeedAugment(**PRESETS[kind])
