"""Decoding: one policy for files and uploads (formats, refusals, grayscale, resizing)."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.core.errors import ImageError, UserError
from pneumoscan.io.imaging import collect_files, decode_many, load_image, read, read_bytes
from test_data import _jpeg, _truncated_jpeg, rng

# ----------------------------------------------------------------------------- load_image


def _gradient(w=40, h=30):
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("L", "png"),
        ("L", "jpeg"),
        ("LA", "png"),
        ("RGB", "png"),
        ("RGB", "jpg"),
        ("RGBA", "png"),
        ("P", "png"),
        ("CMYK", "jpeg"),
    ],
)
def test_load_image_modes(tmp_path, mode, suffix):
    g = _gradient()
    img = Image.fromarray(g).convert(mode)
    if mode == "RGBA":
        img.putalpha(0)  # fully transparent: the gray values must survive (alpha dropped, not composited)
    if mode == "P":
        img.info["transparency"] = 0
    path = tmp_path / f"x.{suffix}"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    native = load_image(path, None)
    assert native.dtype == np.uint8 and native.shape == g.shape
    assert np.abs(native.astype(int) - g).max() <= (12 if suffix != "png" else 1)
    small = load_image(str(path), 16)
    assert small.dtype == np.uint8 and small.shape == (16, 16)


def test_load_image_16bit_png_scaled_not_clipped(tmp_path):
    a = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    a[0, :3] = (0, 32768, 65535)
    path = tmp_path / "sixteen.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_image(path, None)
    assert out.dtype == np.uint8 and out.shape == (8, 64)
    assert tuple(out[0, :3]) == (0, 128, 255)
    assert out.max() == 255 and out.min() == 0
    assert (np.diff(out[1:].ravel().astype(int)) >= 0).all()  # monotone: no clipping plateau at 255
    assert (out == 255).mean() < 0.05


def test_load_image_int32_and_float(tmp_path):
    i = np.array([[0, 32768, 65535, 70000]], np.int32)
    Image.fromarray(i, mode="I").save(tmp_path / "i.tiff")
    assert tuple(load_image(tmp_path / "i.tiff", None)[0]) == (0, 128, 255, 255)
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tiff")
    assert tuple(load_image(tmp_path / "f.tiff", None)[0]) == (0, 128, 255)


@pytest.mark.parametrize("size", [(17, 23), (23, 17), (64, 64), (600, 400), (400, 600)])
def test_load_image_sizes(tmp_path, size):
    path = _jpeg(tmp_path / "x.jpeg", size, value=200)
    out = load_image(path, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 200).max() <= 3
    assert load_image(path, None).shape == (size[1], size[0])  # (H, W)


def test_load_image_exif_orientation(tmp_path):
    a = np.zeros((20, 40), np.uint8)  # W=40, H=20 as stored
    a[:6, :10] = 255  # bright marker top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    path = tmp_path / "rot.jpeg"
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)

    native = load_image(path, None)
    assert native.shape == (40, 20)  # transposed before any resize
    assert native[:10, -6:].mean() > 200 and native[:10, :6].mean() < 50  # marker now top-right
    out = load_image(path, 32)
    assert out[:4, -4:].mean() > 200 and out[:4, :4].mean() < 50 and out[-4:, :].mean() < 50


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(rng.bytes(500))
    return path


def _text(path: Path) -> Path:
    path.write_text("hello, not a png")
    return path


@pytest.mark.parametrize(
    "make, name, reason",
    [
        (_random_bytes, "random.jpeg", "not an image"),
        (_text, "text.png", "not an image"),
        (_truncated_jpeg, "trunc.jpeg", "truncated"),
        (_truncated_png, "trunc.png", "truncated"),
        (lambda p: p, "missing.jpeg", "not found"),
    ],
)
def test_load_image_errors(tmp_path, make, name, reason):
    path = make(tmp_path / name)
    with pytest.raises(ImageError, match=reason) as e:
        load_image(path, 16)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith(f"{path}: ") and e.value.path == str(path)
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12, 20])  # 144 px: PIL only warns; 400 px: PIL raises
def test_load_image_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="over the limit") as e:
        load_image(path, 8)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- one policy


@pytest.mark.parametrize("fmt, suffix", [("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp"), ("PNG", "png")])
def test_accepted_formats_decode_the_same_from_files_and_bytes(tmp_path, fmt, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(_gradient()).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    from_file = read(path, 16)
    assert (from_file.width, from_file.height, from_file.format) == (40, 30, suffix.replace("tiff", "tiff"))
    np.testing.assert_array_equal(read_bytes(path.read_bytes(), 16).pixels, from_file.pixels)


def _gif(path: Path, frames: int) -> Path:
    images = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(frames)]
    images[0].save(path, format="GIF", save_all=frames > 1, append_images=images[1:])
    return path


def _broken_crc_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(_gradient()).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    idat = raw.index(b"IDAT")
    length = int.from_bytes(raw[idat - 4:idat], "big")
    raw[idat + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    path.write_bytes(bytes(raw))
    return path


def _multi_frame_tiff(path: Path) -> Path:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 255)]
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:])
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: _gif(p / "still.gif", 1), "not an image in a supported format"),
    (lambda p: _gif(p / "anim.gif", 3), "not an image in a supported format"),
    (lambda p: _multi_frame_tiff(p / "two.tiff"), "multi-frame image"),
    (lambda p: _broken_crc_png(p / "crc.png"), "corrupt or truncated"),
])
def test_refusals_are_the_same_for_files_and_uploads(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=reason):
        read(path, 16)
    with pytest.raises(ImageError, match=reason) as e:
        read_bytes(path.read_bytes(), 16, name="upload")
    assert str(e.value).startswith("upload: ")


def test_read_keeps_the_stored_size_through_exif_rotation(tmp_path):
    path = tmp_path / "rot.jpeg"
    img = Image.fromarray(_gradient(40, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: displayed 30 wide, 40 high
    img.save(path, exif=exif)
    picture = read(path, None)
    assert (picture.width, picture.height) == (30, 40) and picture.pixels.shape == (40, 30)


def test_collect_files_and_decode_many(tmp_path, caplog):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    good = [_jpeg(tmp_path / "a" / f"{i}.jpeg") for i in range(3)]
    _jpeg(tmp_path / "a" / ".hidden" / "x.jpeg")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    files = collect_files([tmp_path / "a"])
    assert [f.name for f in files] == ["0.jpeg", "1.jpeg", "2.jpeg", "broken.png"]
    with pytest.raises(UserError, match="no such file"):
        collect_files([tmp_path / "missing"])
    with caplog.at_level(logging.WARNING, logger="pneumoscan.io.imaging"):
        decoded = decode_many(files, 8)
    assert decoded.kept == [0, 1, 2] and decoded.images.shape == (3, 8, 8) and decoded.sizes == [(16, 16)] * 3
    assert [p for p, _ in decoded.skipped] == [str(tmp_path / "a" / "broken.png")]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("skipped 1 unreadable file: ")
    np.testing.assert_array_equal(decoded.images[1], load_image(good[1], 8))
