"""Training-time augmentation.

"seed" reproduces the seed study's Keras ImageDataGenerator, so results can be compared with it.
Evaluation uses no transform: images are already decoded at the model's size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from pneumoscan.errors import UserError

log = logging.getLogger(__name__)

AUGMENTATIONS = ("seed", "none")

# ImageDataGenerator(rotation_range=20, zoom_range=0.15, width_shift_range=0.2,
#                    height_shift_range=0.2, shear_range=0.15, horizontal_flip=True, fill_mode="nearest")
ROTATION = 20.0  # degrees
SCALE = (0.85, 1.15)  # Keras draws x and y zoom independently; torchvision scales isotropically
SHIFT = 0.2  # fraction of the original width / height
SHEAR = 0.15  # Keras' shear_range is in degrees (not radians), as is RandomAffine's shear


def _edge_pad(image_size: int) -> int:
    """Padding that covers every pixel the worst-case affine can pull into the central crop.

    Inverting the affine, a crop corner at (s/2 + shift) per axis is rotated (|x| grows by at most
    cos + sin), unsheared (1 + tan) and unzoomed (1 / min scale); whatever lands outside the
    original image must land on replicated edge pixels, never on RandomAffine's constant fill.
    """
    a, sh = math.radians(ROTATION), math.radians(SHEAR)
    reach = (0.5 + SHIFT) * (math.cos(a) + math.sin(a)) * (1 + math.tan(sh)) / SCALE[0]
    return math.ceil(image_size * (reach - 0.5)) + 2  # + 2: bilinear taps and rounding of the centre


def train_transform(kind: str, image_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable on a uint8 (1, H, W) tensor returning uint8 (1, H, W), or None for no augmentation.

    Keras fills with fill_mode="nearest" (edge replication) but torchvision's affine only fills
    with a constant, and black corners are a shortcut a model can learn. So: pad by edge
    replication far enough for the worst case, transform, and crop back to the original size.
    """
    if kind == "none":
        return None
    if kind != "seed":
        raise UserError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    pad = _edge_pad(image_size)
    shift = SHIFT * image_size / (image_size + 2 * pad)  # RandomAffine's translate is a fraction of its input
    return v2.Compose(
        [
            v2.Pad(pad, padding_mode="edge"),
            v2.RandomAffine(
                degrees=ROTATION,
                translate=(shift, shift),
                scale=SCALE,
                shear=SHEAR,  # degrees, along x only, like Keras
                interpolation=v2.InterpolationMode.BILINEAR,  # Keras' interpolation_order=1
            ),
            v2.CenterCrop(image_size),
            v2.RandomHorizontalFlip(),
        ]
    )
