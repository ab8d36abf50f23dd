"""The decoding budget in bytes (io.budget): estimated from the header, refused over the per-image
budget with one reason, shared by concurrent decodes; and small files that decode big stay within
300 MB of peak RSS growth (measured in a fresh interpreter)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pneumoscan.core.errors import ImageError
from pneumoscan.io import budget, imaging

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def dicom(pixels: np.ndarray, rle: bool = False, rows_cols: tuple[int, int] | None = None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows_cols or pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def small_budget():
    previous = budget.current()
    yield budget.configure(4 * MiB, 8 * MiB, wait_s=30)
    budget.configure(previous.per_decode, previous.total, previous.wait_s)


def png16(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_over_budget_refused_from_the_header_with_one_reason(small_budget):
    with pytest.raises(budget.OverBudget, match=r"about \d+ MiB of memory; the limit is 4 MiB per image"):
        imaging.read_bytes(png16(2000), 224)  # 4 M pixels x (2 + 1) bytes = 12 MB
    with pytest.raises(budget.OverBudget):  # the header says 2000 x 2000: the pixels are never decoded
        imaging.read_bytes(dicom(np.zeros((8, 8)), rows_cols=(2000, 2000)), 224)
    assert imaging.read_bytes(png16(500), 224).pixels.shape == (224, 224)  # 0.75 MB: fits
    assert small_budget.in_use == 0


def test_concurrent_decodes_share_one_budget():
    shared = budget.ByteBudget(per_decode=6, total=10, wait_s=30)
    first_in, release_first, second_in = threading.Event(), threading.Event(), threading.Event()

    def hold_first():
        with shared.hold(6, "a"):
            first_in.set()
            release_first.wait(30)

    def hold_second():
        with shared.hold(6, "b"):
            second_in.set()

    a = threading.Thread(target=hold_first)
    a.start()
    assert first_in.wait(30)
    b = threading.Thread(target=hold_second)
    b.start()
    assert not second_in.wait(0.3)  # 6 + 6 > 10: it waits for the first
    with shared.hold(4, "small"):  # a small decode still fits beside the first
        pass
    release_first.set()
    assert second_in.wait(30)
    a.join(30), b.join(30)
    assert shared.in_use == 0 and shared.peak == 10


def test_busy_budget_says_so():
    shared = budget.ByteBudget(per_decode=6, total=6, wait_s=0.05)
    with shared.hold(6, "a"), pytest.raises(budget.BudgetBusy, match="busy"):
        with shared.hold(1, "b"):
            pass


def test_pixel_limit_message_gives_the_real_size():
    with pytest.raises(ImageError, match="60,000 x 60,000 = 3,600,000,000 pixels") as e:
        imaging.read_bytes(dicom(np.zeros((8, 8)), rows_cols=(60000, 60000)), 224)
    assert "50,000,001" not in str(e.value)


def test_16_bit_and_float_conversion_unchanged_by_strips():
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, size=(600, 300), dtype=np.uint16)
    got = imaging._to_gray(Image.fromarray(a16))
    want = (a16.astype(np.float32) * (255 / 65535) + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(got), want)
    f = rng.random((600, 300), dtype=np.float32)
    got = imaging._to_gray(Image.fromarray(f))
    assert np.array_equal(np.asarray(got), ((f * 255).clip(0, 255) + 0.5).astype(np.uint8))


MEASURE = """
import resource, sys
from pneumoscan.io import imaging, dicom  # imports belong to the baseline
import pydicom.pixels  # noqa
blob = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    imaging.read_bytes(blob, 224)
    result = "decoded"
except Exception as e:
    result = "refused " + type(e).__name__
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, result)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rle_dicom", "png16", "float_tiff"])
def test_small_files_that_decode_big_stay_within_300_mb(tmp_path, kind):
    """The issue's probes: a 1.6 MB RLE DICOM of 7071^2 16-bit pixels, a 16-bit PNG and a float TIFF
    of the same size (each ~50 M pixels, just under the pixel limit) used to cost 0.7-1.6 GB."""
    side = 7071
    path = tmp_path / kind
    if kind == "rle_dicom":
        rows = np.repeat((np.arange(side) // 512 * 200).astype(np.uint16)[:, None], side, axis=1)
        path.write_bytes(dicom(rows, rle=True))
        assert path.stat().st_size < 4 * MiB
    elif kind == "png16":
        Image.fromarray(np.zeros((side, side), np.uint16)).save(path, format="PNG")
    else:
        Image.fromarray(np.zeros((side, side), np.float32)).save(path, format="TIFF", compression="tiff_adobe_deflate")
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    growth, result = out.stdout.split(maxsplit=1)
    assert result.strip() == "decoded" or result.startswith("refused OverBudget"), out.stderr
    assert int(growth) <= 300 * 10**6, f"{int(growth) / 1e6:.0f} MB"
