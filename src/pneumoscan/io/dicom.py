"""DICOM chest radiographs to the 8-bit grayscale arrays every other image becomes.

Hospitals export X-rays as DICOM, whose stored values are not display values: they pass through the
Modality LUT (rescale slope/intercept), then the VOI LUT or window the radiographer chose, then
MONOCHROME1 inversion (bright = low value). Applying those in that order is what makes a DICOM look
like the JPEGs the model was trained on; a plain min-max of the stored values would not.

Only files that can be a single chest radiograph are accepted (one grayscale frame, modality CR,
DX or DR — a missing Modality is accepted); anything else is rejected with ``errors.ImageError``
rather than scored, because a CT slice or a colour secondary capture would still get a confident
probability.

Patient identifiers stay in the file: errors and logs name the path (or upload name) and technical
attributes only, never an element that could identify a patient.

Transfer syntaxes: uncompressed (implicit/explicit little endian, explicit big endian), deflated,
and RLE Lossless natively (pydicom); JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 /
HTJ2K through the pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg), with Pillow also
covering JPEG baseline/extended and JPEG 2000. A syntax with no installed decoder is rejected
with its name in the message.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from pneumoscan import MAX_PIXELS
from pneumoscan.core.errors import ImageError, unreadable
from pneumoscan.io import budget

log = logging.getLogger(__name__)

ACCEPTED_MODALITIES = ("CR", "DX", "DR")  # computed / digital radiography ("DR" is a common vendor code)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
BITS_ALLOCATED = (8, 16)


def read_dicom(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode a single-frame grayscale radiograph to uint8 (H, W) display values.

    ``source`` is a path or the file's bytes; ``name`` is what errors call it (default: the path,
    or "upload" for bytes). A file without the 128-byte preamble and "DICM" marker is still read
    (old or hand-made files), and rejected if it turns out not to be DICOM.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "upload"
        fp = io.BytesIO(source)
    else:
        name = name or os.fspath(source)
        fp = os.fspath(source)
    try:
        ds = pydicom.dcmread(fp, force=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise unreadable(name, e) from None
    except (InvalidDicomError, EOFError) as exc:
        raise ImageError(name, f"not a readable DICOM file ({type(exc).__name__})") from None
    except Exception as exc:  # malformed elements raise anything; their text may quote values
        raise ImageError(name, f"corrupt DICOM file ({type(exc).__name__})") from None

    try:
        need = _check_radiograph(ds, name)
        with budget.hold(need, name):
            pixels = _decode_pixels(ds, name)
            return _display_values(pixels, ds, name)
    except ImageError:
        raise
    except Exception as exc:  # a value that cannot be parsed: report the kind only, never the value
        raise ImageError(name, f"unusable DICOM attributes ({type(exc).__name__})") from None


def _check_radiograph(ds: pydicom.Dataset, name: str) -> int:
    """Reject what cannot be one chest radiograph before spending time decoding pixels; the bytes
    its decoding will take (refused here when over the per-image budget)."""
    if "PixelData" not in ds:
        kind = "float pixel data is not supported" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) \
            else "no pixel data (not an image)"
        raise ImageError(name, kind)
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        log.debug("%s: no Modality attribute; assuming a radiograph", name)
    elif modality not in ACCEPTED_MODALITIES:
        raise ImageError(name, f"modality {modality[:16]} is not a radiograph "
                               f"(accepted: {', '.join(ACCEPTED_MODALITIES)})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(name, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in GRAYSCALE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageError(name, f"photometric interpretation {photometric[:16] or 'missing'} is not grayscale "
                               f"(accepted: {', '.join(GRAYSCALE)})")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in BITS_ALLOCATED:
        raise ImageError(name, f"{bits}-bit pixel data is not supported (accepted: 8 or 16 bits allocated)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)  # the same limit as other images
    if limit and rows * cols > limit:
        raise ImageError(name, budget.pixel_limit_reason(cols, rows, limit))
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    need = budget.dicom_bytes(rows, cols, bits, frames, 1, bool(getattr(syntax, "is_compressed", False)))
    budget.current().check(need, name)
    return need


def _decode_pixels(ds: pydicom.Dataset, name: str) -> np.ndarray:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        # Decoder messages are about transfer syntaxes, plugins and lengths, never element values.
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        syntax_name = getattr(syntax, "name", None) or "unknown transfer syntax"
        raise ImageError(name, f"cannot decode pixel data ({syntax_name}): {detail}") from None
    if pixels.ndim != 2:
        raise ImageError(name, f"pixel array has shape {pixels.shape}; expected one grayscale frame")
    return pixels


STRIP_ROWS = 256  # rows taken through the LUTs at a time: float64 copies of a strip, not the image


def _display_values(pixels: np.ndarray, ds: pydicom.Dataset, name: str) -> np.ndarray:
    """Modality LUT, then VOI LUT / window (or min-max), then MONOCHROME1 inversion -> uint8.

    Strip by strip into one uint8 array: the LUTs work element by element, and the whole image in
    float64 (three copies of it) is what made a 7071^2 16-bit DICOM cost 1.6 GB."""
    voi = _voi_kind(ds)
    if voi is not None:
        try:
            lo, hi = _voi_output_range(ds, voi)
            apply_voi_lut(apply_modality_lut(pixels[:1], ds), ds, prefer_lut=True)  # fails now or not at all
        except (ValueError, TypeError, IndexError, NotImplementedError) as exc:
            log.warning("%s: ignoring unusable VOI LUT / window (%s); using the image's range", name,
                        type(exc).__name__)
            voi = None
    if voi is None:
        lo, hi = _modality_range(pixels, ds)
    out = np.empty(pixels.shape, dtype=np.uint8)
    for top in range(0, pixels.shape[0], STRIP_ROWS):
        values = apply_modality_lut(pixels[top:top + STRIP_ROWS], ds)
        if voi is not None:
            values = apply_voi_lut(values, ds, prefer_lut=True)
        out[top:top + STRIP_ROWS] = np.rint(_rescale(values, lo, hi) * 255)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _modality_range(pixels: np.ndarray, ds: pydicom.Dataset) -> tuple[float, float]:
    """Min and max of the modality values, one strip at a time."""
    lo, hi = np.inf, -np.inf
    for top in range(0, pixels.shape[0], STRIP_ROWS):
        values = np.asarray(apply_modality_lut(pixels[top:top + STRIP_ROWS], ds), dtype=np.float64)
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _voi_kind(ds: pydicom.Dataset) -> str | None:
    """Which VOI transform pydicom's ``apply_voi_lut(prefer_lut=True)`` will apply, if any."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _voi_output_range(ds: pydicom.Dataset, kind: str) -> tuple[float, float]:
    """The range the VOI transform maps onto, so 8-bit scaling keeps the chosen window's contrast
    instead of stretching whatever values this image happens to have."""
    if kind == "lut":
        data = ds.VOILUTSequence[0].LUTData
        table = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.atleast_1d(np.asarray(data))
        return float(table.min()), float(table.max())
    # pydicom's windowing maps everything below / above the window to its y_min / y_max
    lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, prefer_lut=False)
    return float(lo), float(hi)


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] onto [0, 1] (hi < lo flips, as a negative rescale slope means); constant -> 0."""
    if hi == lo or not np.isfinite([lo, hi]).all():
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((np.asarray(values, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
