"""The input-quality gate flags degenerate uploads and lets radiograph-like images through."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pneumoscan.safety import gate


def radiograph_like(seed: int = 0, size: int = 224) -> np.ndarray:
    """Dark background, two bright-edged 'lungs' with smooth texture, a spine: smooth, many grey levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.38) ** 2 + ((yy - 0.55) / 0.5) ** 2) ** 2)
    lungs = sum(np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.28) ** 2) ** 2) for cx in (0.32, 0.68))
    spine = np.exp(-((xx - 0.5) / 0.05) ** 2)
    a = 40 + 170 * body - 90 * lungs + 60 * spine
    tex = np.asarray(Image.fromarray(rng.normal(0, 40, (size, size)).clip(-127, 127).astype(np.int8).view(np.uint8))
                     .filter(ImageFilter.GaussianBlur(3)), dtype=np.float64)
    a = a + 0.15 * (tex - tex.mean())
    return np.clip(a, 0, 255).round().astype(np.uint8)


def codes(img, size=None):
    return {f.check for f in gate.check_quality(img, size)}


def test_radiograph_like_image_passes():
    for seed in range(3):
        img = radiograph_like(seed)
        assert gate.check_quality(img, (1800, 1500)) == [], gate.image_stats(img)


def test_one_pixel_image_is_flagged_for_size_with_a_reason():
    img = np.full((224, 224), 128, np.uint8)  # what a 1x1 PNG becomes after resizing
    flags = gate.check_quality(img, (1, 1))
    assert "min_side" in {f.check for f in flags}
    assert all(f.code == "low_quality" for f in flags)
    assert "1x1 px" in gate.summary(flags) and "64 px" in gate.summary(flags)


def test_strip_is_flagged_for_aspect_and_size():
    assert {"max_aspect", "min_side"} <= codes(radiograph_like(), (4000, 8))
    assert "max_aspect" in codes(radiograph_like(), (1000, 200))
    assert "max_aspect" not in codes(radiograph_like(), (1000, 300))  # 3.3:1 landscape crop


@pytest.mark.parametrize("value", [0, 255, 128])
def test_constant_images_are_flagged(value):
    c = codes(np.full((224, 224), value, np.uint8), (512, 512))
    assert {"min_std", "min_entropy", "max_dominant_fraction"} <= c


def test_uniform_noise_is_flagged_as_rough():
    noise = np.random.default_rng(0).integers(0, 256, (224, 224)).astype(np.uint8)
    assert "max_roughness" in codes(noise, (512, 512))


def test_binary_image_is_flagged():
    img = np.zeros((224, 224), np.uint8)
    img[:, 112:] = 255
    assert {"min_entropy", "max_saturated_fraction"} <= codes(img, (800, 800))


def test_limits_round_trip_and_table():
    lim = gate.QualityLimits(min_side=100)
    assert gate.QualityLimits.from_dict(lim.to_dict()) == lim
    rows = {r["name"]: r for r in gate.limits_table()}
    assert rows["min_side"]["value"] == 64 and rows["min_side"]["kind"] == "reasoned"


def test_fit_limits_follow_the_documented_rule():
    imgs = np.stack([radiograph_like(s, 64) for s in range(20)])
    lim, pct = gate.fit_limits(imgs)
    assert lim.min_std == pytest.approx(0.5 * pct["std"][0.1], abs=1e-3)
    assert lim.max_roughness == pytest.approx(2 * pct["roughness"][99.9], abs=1e-3)
    assert all(gate.check_quality(a, (640, 640), lim) == [] for a in imgs)


def test_rejects_non_uint8():
    with pytest.raises(ValueError):
        gate.image_stats(np.zeros((4, 4), np.float32))
