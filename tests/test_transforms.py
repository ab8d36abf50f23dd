"""The "seed" augmentation: shape, dtype, randomness, and nearest (edge) fill instead of black."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan.core.errors import UserError
from pneumoscan.modeling.transforms import PRESETS, AUGMENTATIONS, SeedAugment, train_transform


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
    assert AUGMENTATIONS == ("seed", "seed-noflip", "radiograph", "acquisition", "acquisition-framing", "none")
    assert train_transform("none", 32) is None
    with pytest.raises(UserError, match="seed, seed-noflip, radiograph, acquisition, acquisition-framing, none"):
        train_transform("heavy", 32)


def test_noflip_never_mirrors():
    # a left-right gradient keeps its direction through every draw when flips are off
    x = torch.linspace(0, 255, 32).repeat(16, 1, 32, 1).to(torch.uint8)
    kept = train_transform("seed-noflip", 32)
    assert not kept.draw(200)[:, 6].any()
    assert train_transform("seed", 32).draw(200)[:, 6].any()
    out = kept(x).float()
    assert (out[..., -4:].mean((1, 2, 3)) > out[..., :4].mean((1, 2, 3))).all()


def test_radiograph_intensity_jitter_is_seeded_bounded_and_changes_contrast():
    aug = train_transform("radiograph", 32)
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    a, b = aug(x, seeds=range(8)), aug(x, seeds=range(8))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    geometry_only = SeedAugment(**{k: v for k, v in PRESETS["radiograph"].items()
                                   if k not in ("contrast", "brightness", "gamma")})
    g = geometry_only(x, seeds=range(8)).float()
    # same geometry draw; only the intensity differs, and it differs per image
    assert not torch.equal(a.float(), g)
    assert a.float().std((1, 2, 3)).sub(g.std((1, 2, 3))).abs().gt(0.5).sum() >= 4
    floats = aug(x.float() / 255)
    assert floats.min() >= 0 and floats.max() <= 1


def test_acquisition_degrades_about_half_the_films_reproducibly_on_uint8_and_float():
    from pneumoscan.modeling.transforms import AcquisitionAugment

    aug = train_transform("acquisition", 64)
    assert isinstance(aug, AcquisitionAugment)
    x = torch.randint(40, 200, (40, 1, 64, 64), dtype=torch.uint8)
    seeds = list(range(40))
    out = aug(x, seeds=seeds)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, aug(x, seeds=seeds))
    plain = SeedAugment(**PRESETS["radiograph"])(x, seeds=seeds)
    degraded = sum(not torch.equal(a, b) for a, b in zip(out, plain))
    assert 8 <= degraded <= 32  # p = 0.5 of 40
    f = aug(x.float() / 255)  # the fine-tuning path: float batches, unseeded
    assert f.dtype == torch.float32 and f.shape == x.shape and 0 <= f.min() and f.max() <= 1


def test_framing_adds_zooming_in_to_the_degradations(monkeypatch):
    from pneumoscan.modeling import shifts, transforms

    crops = []
    real = shifts.crop_zoom
    monkeypatch.setattr(shifts, "crop_zoom", lambda a, frac, cy, cx: crops.append(frac) or real(a, frac, cy, cx))
    a = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    for s in range(100):
        transforms.degrade(a, np.random.default_rng(s))
    assert not crops  # plain "acquisition" never zooms in: the shift suite keeps that kind unseen
    for s in range(100):
        out = transforms.degrade(a, np.random.default_rng(s), framing=True)
        assert out.shape == a.shape and out.dtype == np.uint8
    assert len(crops) >= 15 and all(0.7 <= f <= 0.95 for f in crops)
    assert train_transform("acquisition-framing", 64).framing and not train_transform("acquisition", 64).framing
