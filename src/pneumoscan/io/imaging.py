"""Any input image to the 8-bit grayscale array a model reads: one decoding policy for everyone.

Training, ``predict``, ``explain``, ``evaluate``, the API and the web page all decode through
``read`` (files) or ``read_bytes`` (uploads), so they accept and refuse the same things with the
same one-line reasons. The format is sniffed from the content, never from the file name: PNG,
JPEG, BMP, TIFF and WebP through Pillow (and only those of Pillow's decoders), DICOM through
pydicom (``dicom``). Refused: anything else (GIF included), multi-frame images, PNGs whose
checksums fail, truncated files, and more pixels than ``pneumoscan.MAX_PIXELS`` (the service's
default limit too).

Images are squashed to a square (the dataset's convention: the aspect ratio is not kept); the
original width and height travel with the pixels, so the input-quality gate can see what the
resize hides.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan import MAX_PIXELS
from pneumoscan.core.errors import ImageError, UserError, unreadable
from pneumoscan.io import budget

log = logging.getLogger(__name__)

# Suffixes a folder scan picks up; decoding still sniffs the content.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".bmp", ".tif", ".tiff", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # the only Pillow decoders untrusted bytes reach
FORMAT_NAMES = "PNG, JPEG, BMP, TIFF, WebP or DICOM"
NOT_AN_IMAGE = f"not an image in a supported format ({FORMAT_NAMES}; checked from the content)"

_DICOM_MAGIC_AT = 128  # DICOM Part 10: a 128-byte preamble, then "DICM"
SNIFF_BYTES = _DICOM_MAGIC_AT + 4
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"),
          (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
_MAX_LISTED = 10  # paths named in one log line before "..."
_STRIP_ROWS = 256  # rows converted at a time from 16-bit / float: no full-size float copy


@dataclass(frozen=True)
class Picture:
    """Decoded pixels plus what the decode saw before squashing them to the model's size."""

    pixels: np.ndarray  # uint8 (H, W); (size, size) when a size was asked for
    width: int  # as stored in the file
    height: int
    format: str  # png, jpeg, bmp, tiff, webp or dicom
    mode: str = "L"  # Pillow's mode as stored (I;16, RGB, RGBA, P, ...); L for DICOM display values


def sniff_format(head: bytes) -> str | None:
    """The format from a file's first ``SNIFF_BYTES`` bytes, or None: names can lie."""
    if head[_DICOM_MAGIC_AT:SNIFF_BYTES] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read(path: str | os.PathLike, size: int | None) -> Picture:
    """Decode one image file, or raise ImageError saying why not.

    DICOM is recognised by content (a renamed or suffix-less file still works), or by a ``.dcm``
    suffix for files without the standard preamble.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise unreadable(path, e) from None
    kind = sniff_format(head)
    if kind is None and path.lower().endswith(".dcm"):
        kind = "dicom"
    return _decode(path, path, size, kind)


def read_bytes(blob: bytes, size: int | None, name: str = "upload") -> Picture:
    """``read`` for bytes (uploads): the same formats, checks and reasons as for files."""
    blob = bytes(blob)
    return _decode(blob, name, size, sniff_format(blob[:SNIFF_BYTES]))


def load_image(path: str | os.PathLike, size: int | None) -> np.ndarray:
    """uint8 (size, size) grayscale pixels of one file (training decodes through this)."""
    return read(path, size).pixels


def decode_image_bytes(blob: bytes, size: int | None, name: str = "upload") -> np.ndarray:
    return read_bytes(blob, size, name).pixels


def _decode(source: str | bytes, name: str, size: int | None, kind: str | None) -> Picture:
    if kind is None:
        raise ImageError(name, NOT_AN_IMAGE)
    if kind == "dicom":
        from pneumoscan.io import dicom  # pydicom is only imported when a DICOM shows up

        pixels = dicom.read_dicom(source, name=name)  # holds its own share of the decode budget
        return _finish(Image.fromarray(pixels), name, size, kind, "L", (pixels.shape[1], pixels.shape[0]))
    return _open_pil(source, name, size)


def _finish(img: Image.Image, name: str, size: int | None, kind: str, mode: str,
            stored: tuple[int, int]) -> Picture:
    try:
        img = _to_gray(img)
    except ValueError as e:
        raise ImageError(name, f"unsupported image mode {mode} ({e})") from None
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return Picture(np.array(img, dtype=np.uint8), stored[0], stored[1], kind, mode)


def _open_pil(source: str | bytes, name: str, size: int | None) -> Picture:
    """The decoded picture, with its stored size and mode (before JPEG draft mode changes it).
    Truncated or corrupt data raise rather than decode half-grey: a partial X-ray is a wrong
    input, not a smaller one. What the decode will allocate is estimated from the header and
    held against the decode budget (``io.budget``) until the picture is at its final size."""
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)

    def open_() -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=PIL_FORMATS)

    try:
        with open_() as img:
            # PIL only warns between 1x and 2x its limit. Checked here rather than by turning the
            # warning into an error: warnings.catch_warnings is not thread-safe.
            if limit and img.width * img.height > limit:
                raise ImageError(name, budget.pixel_limit_reason(img.width, img.height, limit))
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ImageError(name, f"multi-frame image ({frames} frames); expected a single radiograph")
            stored, mode = img.size, img.mode
            budget.current().check(budget.pil_bytes(mode, *stored), name)  # refuse before any decoding
            if img.format == "PNG":
                img.verify()  # checks every chunk's CRC, which a plain decode skips
        if stored[0] < 1 or stored[1] < 1:
            raise ImageError(name, "the image has no pixels")
        with open_() as img:  # verify() leaves the image unusable: open again to decode
            if size is not None and img.format == "JPEG":
                img.draft("L", (size, size))  # let libjpeg downscale while decoding huge JPEGs
            with budget.hold(budget.pil_bytes(img.mode, *img.size), name):
                img.load()  # force the full decode so truncation surfaces now
                oriented = _oriented(img, stored)
                ImageOps.exif_transpose(img, in_place=True)  # no copy of the full image
                return _finish(img, name, size, img.format.lower(), mode, oriented)
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise unreadable(name, e) from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"pixel count is over the limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(name, NOT_AN_IMAGE) from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...) for bad data
        raise ImageError(name, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _oriented(img: Image.Image, stored: tuple[int, int]) -> tuple[int, int]:
    """The stored size as displayed: EXIF orientations 5-8 swap width and height."""
    orientation = img.getexif().get(0x0112, 1)
    return (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale without losing the range of 16-bit and float X-rays."""
    mode = img.mode
    if mode == "L":
        return img
    if mode.startswith("I"):
        # 16-bit PNGs open as I;16 (or I in older Pillow). convert("L") would clip at 255 and turn
        # most of the image white, so scale the full 16-bit range linearly instead.
        return _by_strips(img, lambda a: (a.astype(np.float32).clip(0, 65535) * (255 / 65535) + 0.5).astype(np.uint8))
    if mode == "F":
        # No standard range for floats: [0, 1] if it fits there, else taken as 0..255.
        lo = hi = None
        for a in _strips(img):
            a = np.nan_to_num(a)
            lo = float(a.min()) if lo is None else min(lo, float(a.min()))
            hi = float(a.max()) if hi is None else max(hi, float(a.max()))
        scale = 255.0 if lo is not None and lo >= 0 and hi <= 1 else 1.0
        return _by_strips(img, lambda a: ((np.nan_to_num(a) * scale).clip(0, 255) + 0.5).astype(np.uint8))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # via RGBA: palette transparency converts without warnings
    return img.convert("L")  # LA/RGBA: alpha dropped; RGB/CMYK/YCbCr: ITU-R 601-2 luma


def _strips(img: Image.Image):
    """The image as numpy arrays of a few rows each: ``np.asarray(img)`` of a 7071^2 float TIFF
    would copy 200 MB at once, and float arithmetic on it more."""
    width, height = img.size
    for top in range(0, height, _STRIP_ROWS):
        yield np.asarray(img.crop((0, top, width, min(height, top + _STRIP_ROWS))))


def _by_strips(img: Image.Image, to_uint8) -> Image.Image:
    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    top = 0
    for a in _strips(img):
        out[top:top + a.shape[0]] = to_uint8(a)
        top += a.shape[0]
    return Image.fromarray(out)


# ----------------------------------------------------------------------------- many files


def leave_out_reason(path: Path) -> str | None:
    """Why a folder scan passes over ``path``, or None for a candidate image file."""
    if path.name.startswith("."):
        return "hidden"  # .DS_Store, ._foo.jpeg (macOS resource forks)
    if path.is_dir():
        return "a folder"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not a {'/'.join(IMAGE_SUFFIXES)} file"
    return None


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively) into image files; a missing path is a user error.

    Files named one by one are kept whatever their suffix (decoding then says what they are);
    in folders, only image suffixes count and hidden files are skipped.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if leave_out_reason(f) is None
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"no images in {p} (looked for {', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return files


@dataclass
class Decoded:
    """The images of ``decode_many``: ``kept`` indexes the inputs that decoded."""

    images: np.ndarray  # uint8 (len(kept), size, size)
    kept: list[int]
    skipped: list[tuple[str, str]]  # (path, reason)
    sizes: list[tuple[int, int]]  # stored (width, height) of each kept image


def decode_many(paths: Sequence[str | os.PathLike], size: int, *, strict: bool = False, warn: bool = True,
                progress: Callable[[int], None] | None = None) -> Decoded:
    """Decode files into one (N, size, size) uint8 array, skipping (and listing) unreadable ones.

    One bad JPEG among 5,000 should not cost a run, but it must not go unseen: every caller gets
    the same ``skipped`` list and, unless ``warn`` is off because the caller names each file itself,
    one warning line (``strict`` raises at the first instead).
    ``progress(k)`` gets the number of files handled so far, from the calling thread.
    """
    paths = [os.fspath(p) for p in paths]
    images = np.empty((len(paths), size, size), dtype=np.uint8)
    sizes: list[tuple[int, int] | None] = [None] * len(paths)

    def decode(i: int) -> None:
        picture = read(paths[i], size)
        images[i] = picture.pixels  # rows are disjoint: safe across threads
        sizes[i] = (picture.width, picture.height)

    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    # Two threads: PIL releases the GIL while decoding, and the machines have few cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(decode, i) for i in range(len(paths))]
        try:
            for i, fut in enumerate(futures):
                try:
                    fut.result()
                    kept.append(i)
                except ImageError as e:
                    if strict:
                        raise
                    skipped.append((e.path, e.reason))
                if progress is not None:
                    progress(i + 1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if skipped:
        if warn:
            warn_skipped(skipped)
        for j, i in enumerate(kept):  # compact in place rather than copying ~260 MB
            if i != j:
                images[j] = images[i]
        images = images[: len(kept)]
    return Decoded(images, kept, skipped, [sizes[i] for i in kept])


def warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """The one log line every command writes for files it could not use."""
    if skipped:
        n = len(skipped)
        log.warning("skipped %d unreadable file%s: %s", n, "" if n == 1 else "s", truncate([p for p, _ in skipped]))


def truncate(items: Sequence[str], n: int = _MAX_LISTED) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
