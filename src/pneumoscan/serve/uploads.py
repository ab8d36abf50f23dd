"""Untrusted upload bytes to a model input, refusing what is too big before decoding it.

The format is sniffed from the bytes, never taken from the file name or the Content-Type a
browser guessed. The pixel count is read from the header alone (PIL opens lazily; pydicom stops
before the pixel data), so a small file that expands to gigabytes is refused without being
decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

import re

from pneumoscan.io import budget, imaging
from pneumoscan.core.errors import ImageError


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


class Rejected(Exception):
    """An upload the service will not score; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def pixel_count(blob: bytes, kind: str) -> int:
    """Pixels the full decode would produce, from the header only (all frames of a DICOM)."""
    if kind == "dicom":
        import pydicom  # imported here: only DICOM uploads pay for it

        ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames
    with Image.open(io.BytesIO(blob), formats=imaging.PIL_FORMATS) as img:
        return img.width * img.height * getattr(img, "n_frames", 1)


def decode_bytes(blob: bytes, kind: str) -> int:
    """What decoding will allocate (``io.budget``'s estimate), from the header alone."""
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
        syntax = getattr(getattr(ds, "file_meta", None), "get", lambda _: None)("TransferSyntaxUID")
        return budget.dicom_bytes(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
                                  int(ds.get("BitsAllocated", 8) or 8), int(ds.get("NumberOfFrames", 1) or 1),
                                  int(ds.get("SamplesPerPixel", 1) or 1), bool(getattr(syntax, "is_compressed", False)))
    with Image.open(io.BytesIO(blob), formats=imaging.PIL_FORMATS) as img:
        return budget.pil_bytes(img.mode, *img.size)


def check_size(n_bytes: int, limits: Limits) -> None:
    if n_bytes > limits.max_bytes:
        raise Rejected(413, "file_too_large",
                       f"the file is {n_bytes / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.1f} MiB")


def check(blob: bytes, limits: Limits) -> str:
    """The sniffed format of an acceptable upload, or ``Rejected`` (413 too big, 422 not an image)."""
    if not blob:
        raise Rejected(422, "empty_upload", "the uploaded file is empty")
    check_size(len(blob), limits)
    kind = imaging.sniff_format(blob[:imaging.SNIFF_BYTES])
    if kind is None:
        raise Rejected(422, "not_an_image", imaging.NOT_AN_IMAGE)
    try:
        pixels = pixel_count(blob, kind)
    except Image.DecompressionBombError as exc:  # PIL's own, larger limit tripped reading the header
        found = re.search(r"\((\d+) pixels\)", str(exc))  # its message has the real count
        raise Rejected(413, "too_many_pixels", f"the image has {int(found[1]):,} pixels, over the limit of "
                                               f"{limits.max_pixels:,}" if found else
                       f"the image has more pixels than the limit of {limits.max_pixels:,}") from None
    except Exception as exc:  # a header PIL or pydicom cannot parse: corrupt, whatever its magic bytes
        raise Rejected(422, "not_an_image", f"unreadable {kind.upper()} header ({type(exc).__name__})") from None
    if pixels > limits.max_pixels:
        raise Rejected(413, "too_many_pixels", f"the image has {pixels:,} pixels, over the limit of {limits.max_pixels:,}")
    if pixels == 0:
        raise Rejected(422, "not_an_image", f"the {kind.upper()} header declares no pixels")
    return kind


def to_model_input(blob: bytes, size: int, limits: Limits) -> imaging.Picture:
    """Checked, decoded, grayscale uint8 (size, size) pixels (what the model reads), with the
    stored width and height the input-quality gate needs."""
    check(blob, limits)
    try:
        # name="upload", never the client's file name: decode errors may end up in logs
        return imaging.read_bytes(blob, size, name="upload")
    except budget.OverBudget as exc:
        raise Rejected(413, "decode_too_large", exc.reason) from None
    except budget.BudgetBusy as exc:
        raise Rejected(503, "busy", exc.reason) from None
    except ImageError as exc:
        raise Rejected(422, "not_an_image", exc.reason) from None

