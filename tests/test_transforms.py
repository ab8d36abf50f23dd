"""The "seed" augmentation: shape, dtype, randomness, and nearest (edge) fill instead of black."""

from __future__ import annotations

import pytest
import torch

from pneumoscan.errors import UserError
from pneumoscan.transforms import AUGMENTATIONS, SeedAugment, train_transform


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


def test_identity_parameters_leave_the_image_unchanged_and_flip_flips():
    aug = SeedAugment()
    x = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    identity = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    grid = torch.nn.functional.affine_grid(aug.theta(identity), [2, 1, 20, 20], align_corners=False)
    y = torch.nn.functional.grid_sample(x.float(), grid, align_corners=False, padding_mode="border")
    assert torch.allclose(y[0], x[0].float(), atol=1e-3)
    assert torch.allclose(y[1], x[1].float().flip(-1), atol=1e-3)


def test_shift_moves_content_by_a_fraction_of_the_size_with_edge_fill():
    x = torch.zeros(1, 1, 10, 10)
    x[..., :, 5:] = 100.0  # right half bright
    params = torch.tensor([[0, 0.2, 0, 0, 1, 1, 0]])  # tx = 20% of width: sample 2 px to the right
    grid = torch.nn.functional.affine_grid(SeedAugment.theta(params), [1, 1, 10, 10], align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="border")
    assert torch.equal(y[0, 0, 0], torch.tensor([0, 0, 0, 100, 100, 100, 100, 100, 100, 100.0]))


def test_per_image_seeds_do_not_depend_on_the_batch():
    aug = SeedAugment()
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    together = aug(x, seeds=[1, 2, 3])
    alone = aug(x[1:2], seeds=[2])
    assert torch.equal(together[1], alone[0])


def test_none_and_unknown():
    assert AUGMENTATIONS == ("seed", "none")
    assert train_transform("none", 32) is None
    with pytest.raises(UserError, match="seed, none"):
        train_transform("heavy", 32)
