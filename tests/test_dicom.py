"""DICOM input: display pipeline (modality LUT, VOI, MONOCHROME1), rejection, sniffing, privacy."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from pneumoscan.io import imaging
from pneumoscan.core.errors import ImageError
from pneumoscan.io.imaging import decode_image_bytes, load_image
from pneumoscan.io.dicom import read_dicom

PATIENT = "Doe^Janet"
PATIENT_ID = "MRN-7731904"


def make_dicom(pixels: np.ndarray, *, modality: str | None = "DX", photometric: str = "MONOCHROME2",
               frames: int = 1, with_pixels: bool = True, **attrs) -> FileDataset:
    """A minimal Part-10 dataset carrying patient identifiers that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("test", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19470312"
    ds.AccessionNumber = "ACC99812"
    if modality is not None:
        ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    pixels = np.ascontiguousarray(pixels)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = attrs.pop("BitsStored", bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(dtype=np.uint16, top: int = 4095, shape=(32, 48)) -> np.ndarray:
    return np.linspace(0, top, int(np.prod(shape))).reshape(shape).astype(dtype)


def test_8bit_min_max(tmp_path):
    pixels = ramp(np.uint8, 200)  # 0..200 stretched to 0..255
    out = read_dicom(save(make_dicom(pixels), tmp_path / "a.dcm"))
    assert out.dtype == np.uint8 and out.shape == (32, 48)
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out, np.rint(pixels / 200 * 255), atol=1)


def test_16bit_uses_full_precision(tmp_path):
    pixels = ramp(np.uint16, 4095)
    pixels[0, 3:6] = (1000, 2000, 3000)  # 12-bit values, far above 255
    out = load_image(save(make_dicom(pixels, BitsStored=12), tmp_path / "b.dcm"), None)
    assert out.shape == (32, 48)
    assert tuple(out[0, 3:6]) == tuple(np.rint(np.array([1000, 2000, 3000]) / 4095 * 255).astype(int))
    assert (np.diff(out[1:].ravel().astype(int)) >= 0).all()


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp(np.uint16, 1000)
    mono2 = read_dicom(save(make_dicom(pixels), tmp_path / "m2.dcm"))
    mono1 = read_dicom(save(make_dicom(pixels, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    assert mono2[0, 0] == 0 and mono1[0, 0] == 255
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_window_applied_after_rescale(tmp_path):
    # stored 0..4000 -> rescaled (x * 2 - 1000) = -1000..7000; window [0, 2000] in rescaled units
    pixels = ramp(np.uint16, 4000)
    ds = make_dicom(pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000.5, WindowWidth=2001)
    out = read_dicom(save(ds, tmp_path / "w.dcm"))
    rescaled = pixels.astype(float) * 2 - 1000
    assert (out[rescaled <= 0] == 0).all() and (out[rescaled >= 2000] == 255).all()
    inside = (rescaled > 100) & (rescaled < 1900)
    np.testing.assert_allclose(out[inside], rescaled[inside] / 2000 * 255, atol=1.5)
    # without the window the same file is min-max scaled: a different picture
    plain = read_dicom(save(make_dicom(pixels, RescaleSlope=2, RescaleIntercept=-1000), tmp_path / "p.dcm"))
    assert np.abs(plain.astype(int) - out).max() > 50


def test_window_on_monochrome1_inverts_after_windowing(tmp_path):
    pixels = ramp(np.uint16, 4000)
    ds = make_dicom(pixels, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=1000)
    out = read_dicom(save(ds, tmp_path / "w1.dcm"))
    assert (out[pixels < 1400] == 255).all() and (out[pixels > 2600] == 0).all()


def test_voi_lut_table_is_applied(tmp_path):
    pixels = ramp(np.uint16, 4095)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "OW", (np.arange(4096)[::-1] * 8).astype("<u2").tobytes())  # 32760..0: inverts
    ds = make_dicom(pixels, BitsStored=12, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10)
    out = read_dicom(save(ds, tmp_path / "lut.dcm"))  # the table wins over the window, as in pydicom
    plain = read_dicom(save(make_dicom(pixels, BitsStored=12), tmp_path / "plain.dcm"))
    np.testing.assert_allclose(out, 255 - plain.astype(int), atol=1)


def test_rescale_slope_intercept_alone_keeps_relative_values(tmp_path):
    pixels = ramp(np.uint16, 1000)
    negative = read_dicom(save(make_dicom(pixels, RescaleSlope=-1, RescaleIntercept=1000), tmp_path / "n.dcm"))
    positive = read_dicom(save(make_dicom(pixels), tmp_path / "q.dcm"))
    np.testing.assert_allclose(negative, 255 - positive.astype(int), atol=1)  # slope -1 flips what is bright
    assert negative[0, 0] == 255 and negative[-1, -1] == 0


def test_signed_pixels(tmp_path):
    pixels = np.linspace(-1000, 1000, 32 * 48).reshape(32, 48).astype(np.int16)
    out = read_dicom(save(make_dicom(pixels), tmp_path / "s.dcm"))
    expected = (pixels.astype(float) - pixels.min()) / (int(pixels.max()) - int(pixels.min())) * 255
    assert out[0, 0] == 0 and out[-1, -1] == 255
    np.testing.assert_allclose(out, expected, atol=0.51)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed(tmp_path, syntax):
    pixels = ramp(np.uint16, 4095)
    ds = make_dicom(pixels, BitsStored=12)
    try:
        ds.compress(syntax)
    except RuntimeError as exc:  # no encoder plugin installed for this syntax
        pytest.skip(str(exc))
    assert ds.file_meta.TransferSyntaxUID == syntax
    path = save(ds, tmp_path / "c.dcm")
    np.testing.assert_array_equal(read_dicom(path), read_dicom(save(make_dicom(pixels), tmp_path / "u.dcm")))


@pytest.mark.parametrize("change, reason", [
    (dict(frames=3), "multi-frame"),
    (dict(with_pixels=False), "no pixel data"),
    (dict(modality="CT"), "modality CT"),
    (dict(photometric="RGB"), "not grayscale"),
])
def test_not_a_radiograph_is_rejected(tmp_path, caplog, change, reason):
    frames = change.get("frames", 1)
    pixels = ramp(np.uint16, 4095, shape=(frames, 16, 16) if frames > 1 else (16, 16))
    path = save(make_dicom(pixels, **change), tmp_path / "bad.dcm")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageError, match=reason) as e:
        load_image(path, 16)
    assert e.value.path == str(path)
    for text in (str(e.value), caplog.text):
        assert "Doe" not in text and "Janet" not in text and PATIENT_ID not in text and "19470312" not in text


def test_missing_modality_is_accepted_and_nothing_identifying_is_logged(tmp_path, caplog):
    path = save(make_dicom(ramp(), modality=None), tmp_path / "nomod.dcm")
    caplog.set_level(logging.DEBUG)
    assert load_image(path, 16).shape == (16, 16)
    assert "nomod.dcm" in caplog.text and "Modality" in caplog.text
    assert "Doe" not in caplog.text and PATIENT_ID not in caplog.text


def test_corrupt_dicom_names_only_the_file(tmp_path):
    good = save(make_dicom(ramp()), tmp_path / "good.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(good[: len(good) - 500])  # pixel data cut short
    with pytest.raises(ImageError, match="cut.dcm") as e:
        load_image(path, 16)
    assert "Doe" not in str(e.value) and PATIENT_ID not in str(e.value)


def test_sniffed_by_content_not_name(tmp_path):
    blob = save(make_dicom(ramp()), tmp_path / "x.dcm").read_bytes()
    expected = load_image(tmp_path / "x.dcm", 24)
    for name in ("IMG0001", "scan.png"):  # no suffix; a mislabeled file
        (tmp_path / name).write_bytes(blob)
        np.testing.assert_array_equal(load_image(tmp_path / name, 24), expected)
    np.testing.assert_array_equal(decode_image_bytes(blob, 24, name="upload.jpeg"), expected)
    assert ".dcm" in imaging.IMAGE_SUFFIXES


def test_dicom_without_preamble_is_read_by_suffix(tmp_path):
    ds = make_dicom(ramp())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = buf.getvalue()[132:] if buf.getvalue()[128:132] == b"DICM" else buf.getvalue()
    (tmp_path / "old.dcm").write_bytes(raw)
    assert imaging.sniff_format(raw[:132]) is None
    assert load_image(tmp_path / "old.dcm", 16).shape == (16, 16)


def test_decode_image_bytes_same_pipeline_as_files(tmp_path):
    img = (np.add.outer(np.arange(40), np.arange(40)) * 3).astype(np.uint8)
    for fmt in ("PNG", "JPEG"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(img).save(path, format=fmt)
        np.testing.assert_array_equal(decode_image_bytes(path.read_bytes(), 20, name="f"), load_image(path, 20))


def test_decode_image_bytes_rejects_other_content(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="GIF")  # GIF: not among the accepted formats
    for blob in (buf.getvalue(), b"hello", b""):
        with pytest.raises(ImageError, match="not an image") as e:
            decode_image_bytes(blob, 8, name="my.png")
        assert e.value.path == "my.png"
    with pytest.raises(ImageError, match="truncated"):
        decode_image_bytes(b"\xff\xd8\xff\xe0 broken", 8)
