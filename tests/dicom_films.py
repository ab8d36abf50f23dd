"""Synthetic DICOM films for the node's tests and benchmark: the repo's sample JPEGs, wrapped.

Every text attribute that could carry an identifier can be set to a planted value, so a test can
grep logs for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "examples" / "chest_xray_sample"
CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
           "CT": "1.2.840.10008.5.1.4.1.1.2", "MG": "1.2.840.10008.5.1.4.1.1.1.2"}


def sample_jpegs(n: int, label: str = "PNEUMONIA") -> list[Path]:
    files = sorted((SAMPLES / "train" / label).glob("*.jpeg")) + sorted((SAMPLES / "test" / label).glob("*.jpeg"))
    return files[:n]


def chest_film(jpeg: Path | None = None, *, study_uid: str | None = None, modality: str = "DX",
               view: str = "PA", body_part: str = "CHEST", patient: str = "TEST^PATIENT", identifier: str = "ID1",
               sop_class: str | None = None, size: int | None = 256, pixels: np.ndarray | None = None,
               instance: int = 1) -> FileDataset:
    """A single-frame MONOCHROME2 8-bit film; ``identifier`` goes into every identifying text field."""
    if pixels is None:
        img = Image.open(jpeg).convert("L")
        if size:
            img = img.resize((size, size))
        pixels = np.asarray(img, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or CLASSES.get(modality, CLASSES["DX"])
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = modality, view, body_part
    ds.PatientName, ds.PatientID, ds.AccessionNumber = patient, identifier, identifier[:16]
    ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.StudyDate, ds.StudyTime = "19800101", "O", "1", "20260101", "120000"
    ds.ReferringPhysicianName, ds.InstitutionName, ds.StudyDescription = patient, identifier, identifier
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sr_items(sr) -> dict[str, object]:
    """Concept name -> value of every content item of an SR, depth first: numbers and codes (the
    last one wins), texts as a list of all of them."""
    out: dict[str, object] = {}

    def walk(seq):
        for it in seq:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if "MeasuredValueSequence" in it:
                out[name] = float(it.MeasuredValueSequence[0].NumericValue)
            elif "ConceptCodeSequence" in it:
                out[name] = it.ConceptCodeSequence[0].CodeValue
            elif "TextValue" in it:
                out.setdefault(name, []).append(it.TextValue)
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out
