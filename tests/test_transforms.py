"""The "seed" augmentation: shape, dtype, randomness, and nearest (edge) fill instead of black."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as F

from pneumoscan.errors import UserError
from pneumoscan.transforms import AUGMENTATIONS, train_transform


@pytest.mark.parametrize("size", [16, 17, 32])
def test_seed_keeps_shape_and_dtype(size):
    t = train_transform("seed", size)
    x = torch.randint(0, 256, (1, size, size), dtype=torch.uint8)
    y = t(x)
    assert y.dtype == torch.uint8 and y.shape == (1, size, size)


def test_seed_is_random_and_seedable():
    t = train_transform("seed", 32)
    x = torch.arange(32 * 32).reshape(1, 32, 32).to(torch.uint8)
    outs = [t(x) for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(0)
    a = t(x)
    torch.manual_seed(0)
    assert torch.equal(a, t(x))


def test_seed_fills_nearest_not_black():
    t = train_transform("seed", 24)
    white = torch.full((1, 24, 24), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    for _ in range(50):
        y = t(white)
        assert y[0, [0, 0, -1, -1], [0, -1, 0, -1]].tolist() == [255] * 4  # corners
        assert y.min() == 255


@pytest.mark.parametrize("size", [16, 33, 64])
def test_padding_covers_worst_case(size):
    t = train_transform("seed", size)
    pad, affine = t.transforms[0].padding, t.transforms[1]
    padded = size + 2 * (pad if isinstance(pad, int) else pad[0])
    x = torch.full((1, padded, padded), 255, dtype=torch.uint8)
    shift = round(affine.translate[0] * padded)
    assert abs(shift - 0.2 * size) <= 1  # shifts are a fraction of the original size, not the padded one
    for angle, tx, ty, shear in itertools.product((-20, 20), (-shift, shift), (-shift, shift), (-0.15, 0.15)):
        y = F.affine(
            x, angle=angle, translate=[tx, ty], scale=0.85, shear=[shear, 0.0], interpolation=affine.interpolation
        )
        assert F.center_crop(y, [size, size]).min() == 255


def test_none_and_unknown():
    assert AUGMENTATIONS == ("seed", "none")
    assert train_transform("none", 32) is None
    with pytest.raises(UserError, match="seed, none"):
        train_transform("heavy", 32)
