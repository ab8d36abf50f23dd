"""A real `pneumoscan -v serve` (debug logging) keeps upload content out of its log and stderr, and
SIGTERM under a slow upload drains: no 500, no traceback, exit 0."""

from __future__ import annotations

import contextlib
import http.client
import io
import signal
import threading
import time

import numpy as np
import pydicom.config
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from test_serve_hostile import KEY, Server, png_bytes, read_answer, upload_head

pytestmark = pytest.mark.slow

PLANT = "LEAKTEST^PATIENT"
TEXT_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyDescription", "SeriesDescription", "InstitutionName", "ReferringPhysicianName",
                   "OperatorsName", "BodyPartExamined", "ImageComments", "StudyID", "RescaleType",
                   "WindowCenterWidthExplanation", "DeviceSerialNumber", "StationName")


@contextlib.contextmanager
def lenient_writing():
    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = previous


def put_raw(ds: FileDataset, keyword: str, value: str) -> None:
    """Store a value as the file's bytes, unparsed, so it can be invalid for its VR (as in the wild)."""
    tag = Tag(keyword)
    raw = value.encode() + (b" " if len(value) % 2 else b"")
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def planted_dicom(**overrides) -> bytes:
    """A DX radiograph with the plant in every text attribute; ``overrides`` set (or break) the
    attributes decoding reads (Modality, WindowCenter, NumberOfFrames...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    with lenient_writing():
        for name in TEXT_ATTRIBUTES:
            setattr(ds, name, PLANT)
        ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
        rle = overrides.pop("rle", False)
        for name, value in overrides.items():
            put_raw(ds, name, value)
        if rle:
            ds.compress(RLELossless)
            ds.PixelData = ds.PixelData[:40] + PLANT.encode() * 20  # corrupt compressed data
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def planted_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", PLANT)
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes())).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


UPLOADS = {
    "plain": planted_dicom(),
    "bad_window": planted_dicom(WindowCenter=PLANT, WindowWidth=PLANT),
    "bad_frames": planted_dicom(NumberOfFrames=PLANT),
    "bad_rescale": planted_dicom(RescaleSlope=PLANT, RescaleIntercept=PLANT),
    "bad_modality": planted_dicom(Modality=PLANT),
    "bad_photometric": planted_dicom(PhotometricInterpretation=PLANT),
    "corrupt_rle": planted_dicom(rle=True),
}


def test_no_planted_value_reaches_the_log(trained_model, tmp_path):
    folder = tmp_path / PLANT  # the server's own paths carry the plant too
    server = Server(trained_model, folder, "--header-timeout", "5")
    try:
        statuses = {}
        for label, blob in [*UPLOADS.items(), ("png_text", planted_png())]:
            statuses[label] = server.predict(blob, name=f"{PLANT}-{label}.dcm")[0]
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for path in (f"/v1/predict/{PLANT}", f"/{PLANT}", f"/static/{PLANT}.js", f"/v1/health?who={PLANT}"):
            c.request("GET", path.replace("^", "%5E"), headers={"X-API-Key": KEY})
            c.getresponse().read()
        c.close()
        sock = server.connect()  # a request line the server cannot parse
        sock.sendall(f"GET /{PLANT} HTTP/1.1\r\nHost: {PLANT}\r\nX-Bad\r\n\r\n".encode())
        read_answer(sock)
        sock.close()
    finally:
        code = server.stop()
    log = server.log()
    assert statuses["plain"] == 200 and statuses["png_text"] == 200, statuses
    assert all(s < 500 for s in statuses.values()), statuses
    assert "upload refused: 422" in log and "GET (no route) 404" in log  # the log does speak
    assert "decoder warning" in log  # pydicom did warn about the planted values: as a code and a count
    assert PLANT not in log and "LEAKTEST" not in log, [line for line in log.splitlines() if "LEAKTEST" in line]
    assert "Traceback" not in log
    assert code == 0


def test_sigterm_under_a_slow_upload_drains_and_exits_0(trained_model, tmp_path):
    server = Server(trained_model, tmp_path, "--grace-seconds", "2", "--body-timeout", "60")
    answers: dict[str, bytes] = {}
    blob = png_bytes()
    boundary = "b"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n").encode()
    body = part + blob + f"\r\n--{boundary}--\r\n".encode()

    def upload(label: str, finish_after_signal: bool) -> None:
        sock = server.connect()
        sock.sendall(upload_head(len(body), KEY, "/v1/predict") + body[:50])
        signalled.wait(30)
        if finish_after_signal:  # a slow client that still finishes within the grace period
            sock.sendall(body[50:])
        answers[label] = read_answer(sock)
        sock.close()

    signalled = threading.Event()
    clients = [threading.Thread(target=upload, args=("finishes", True)),
               threading.Thread(target=upload, args=("stalls", False))]
    for t in clients:
        t.start()
    time.sleep(1.0)  # both uploads are in flight
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    signalled.set()
    code = server.proc.wait(timeout=60)
    for t in clients:
        t.join(30)
    log = server.stop()
    text = server.log()
    assert code == 0, text[-2000:]
    assert answers["finishes"].startswith(b"HTTP/1.1 200"), answers["finishes"][:300]
    assert answers["stalls"].startswith(b"HTTP/1.1 503"), answers["stalls"][:300]
    assert b"retry-after" in answers["stalls"].lower()
    assert "Traceback" not in text and " 500 " not in text, text[-2000:]
    del log
