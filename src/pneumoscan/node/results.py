"""The result objects: a TID 1500 Comprehensive SR per scored film, optionally a Secondary Capture.

What goes in is what a reader and an auditor need (IHE AI Results): the probability, the label,
every flag with its sentence, the threshold, the source image (content reference and the
evidence sequence viewers follow), and the algorithm (name, version, model sha256). Patient
and study attributes are copied by highdicom from the source, as DICOM requires: nothing more.

UIDs are derived from the source SOP Instance UID and the model's sha256
(``generate_uid(entropy_srcs=...)``): the same film scored by the same model gives the same SR
UID, so a re-sent film is a duplicate the PACS recognises, not a second report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pneumoscan import __version__

DISCLAIMER = "AI screening aid, not a diagnosis"
SC_CAPTION = "AI screening aid, not for diagnosis"
MANUFACTURER = "pneumoscan"
SCHEME = "99PNEUMOSCAN"  # private coding scheme for concepts no public code names
PROBABILITY = Code("PNEU-P", SCHEME, "Probability of pneumonia")
THRESHOLD = Code("PNEU-THR", SCHEME, "Decision threshold")
LABEL = Code("PNEU-LABEL", SCHEME, "AI screening label")
FLAG = Code("PNEU-FLAG", SCHEME, "Input check flag")
NOTE = Code("PNEU-NOTE", SCHEME, "Note")
NOT_SCORED = Code("PNEU-NOTSCORED", SCHEME, "Instance not scored")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
NO_UNITS = Code("1", "UCUM", "no units")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902


@dataclass(frozen=True)
class Algorithm:
    """The model as results name it."""

    name: str  # architecture
    version: str  # pneumoscan version that made the model
    sha256: str

    def identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=f"pneumoscan {self.name}", version=self.version or __version__,
                                             parameters=[f"model_sha256={self.sha256}"])


def result_uid(source_uid: str, sha256: str, kind: str) -> str:
    """Deterministic UID of a result object of ``kind`` (sr, sc, ...) for one source."""
    return generate_uid(entropy_srcs=[str(source_uid), sha256, kind])


def _group(algorithm: Algorithm, tracking_uid: str, label: str, *, probability: float | None = None,
           threshold: float | None = None, texts: Sequence[tuple[Code, str]] = (),
           source: pydicom.Dataset | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    refs = [hd.sr.SourceImageForMeasurement(source.SOPClassUID, source.SOPInstanceUID)] if source is not None else None
    measurements = []
    if probability is not None:
        measurements.append(hd.sr.Measurement(PROBABILITY, float(probability), NO_UNITS,
                                              algorithm_id=algorithm.identification(), referenced_images=refs))
    if threshold is not None:
        measurements.append(hd.sr.Measurement(THRESHOLD, float(threshold), NO_UNITS))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="pneumoscan screening"),
        finding_type=PNEUMONIA, algorithm_id=algorithm.identification(), measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LABEL, Code(label, SCHEME, label))])
    container = group[0]
    for name, text in [*texts, (NOTE, DISCLAIMER)]:
        container.ContentSequence.append(hd.sr.TextContentItem(name, text[:1024], relationship_type="CONTAINS"))
    return group


def _observer(algorithm: Algorithm) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid("device", algorithm.sha256, "observer"),
                                                       name="pneumoscan", manufacturer_name=MANUFACTURER,
                                                       model_name=algorithm.name)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device))


def _report(algorithm: Algorithm, group, evidence: Sequence[pydicom.Dataset], sop_uid: str,
            instance_number: int = 1) -> hd.sr.ComprehensiveSR:
    report = hd.sr.MeasurementReport(observation_context=_observer(algorithm), procedure_reported=CHEST_XRAY,
                                     imaging_measurements=[group])
    study_uid = evidence[0].StudyInstanceUID
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence), content=report[0], series_instance_uid=result_uid(study_uid, algorithm.sha256, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = "pneumoscan AI screening aid"
    return sr


def film_sr(source: pydicom.Dataset, verdict, algorithm: Algorithm) -> hd.sr.ComprehensiveSR:
    """The SR of one scored film. ``verdict``: a ``safety.decision.Verdict``."""
    texts = [(FLAG, f"{code}: {detail}") for code, detail in zip(verdict.flags, verdict.details)]
    if not verdict.assessed:
        texts.append((NOTE, "the probability is not meaningful: the model is not competent for this image"))
    uid = result_uid(source.SOPInstanceUID, algorithm.sha256, "sr")
    group = _group(algorithm, result_uid(source.SOPInstanceUID, algorithm.sha256, "tracking"), verdict.label,
                   probability=verdict.probability, threshold=verdict.threshold, texts=texts, source=source)
    return _report(algorithm, group, [source], uid, int(source.get("InstanceNumber", 1) or 1))


def study_not_scored_sr(sources: Sequence[pydicom.Dataset], reasons: Sequence[str],
                        algorithm: Algorithm) -> hd.sr.ComprehensiveSR:
    """The SR of a study with no eligible film: each instance's reason, so the PACS shows why."""
    study_uid = sources[0].StudyInstanceUID
    texts = [(NOT_SCORED, f"{s.get('SOPClassUID', '') and pydicom.uid.UID(s.SOPClassUID).name}, "
                          f"instance {i + 1}: {r}") for i, (s, r) in enumerate(zip(sources, reasons))]
    texts.insert(0, (NOTE, "no film of this study is eligible for scoring"))
    group = _group(algorithm, result_uid(study_uid, algorithm.sha256, "study-tracking"), "NOT_SCORED", texts=texts)
    return _report(algorithm, group, sources, result_uid(study_uid, algorithm.sha256, "study-sr"))


def _caption(rgb: np.ndarray, caption: str) -> np.ndarray:
    """A black band under the picture with the caption burned in."""
    from PIL import Image, ImageDraw

    width = rgb.shape[1]
    band = max(16, width // 20)
    canvas = Image.new("RGB", (width, rgb.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    ImageDraw.Draw(canvas).text((4, rgb.shape[0] + band // 4), caption, fill=(255, 255, 0))
    return np.asarray(canvas)


def overlay_sc(source: pydicom.Dataset, overlay_rgb: np.ndarray, algorithm: Algorithm, label: str,
               probability: float) -> hd.sc.SCImage:
    """The film with its Grad-CAM overlay and the caption burned in, in a new series."""
    pixels = _caption(np.ascontiguousarray(overlay_rgb, dtype=np.uint8),
                      f"{SC_CAPTION} | P(pneumonia) {probability:.3f} {label}")
    sc = hd.sc.SCImage.from_ref_dataset(
        source, pixels, "RGB", 8, "PATIENT", result_uid(source.StudyInstanceUID, algorithm.sha256, "sc-series"),
        SC_SERIES_NUMBER, result_uid(source.SOPInstanceUID, algorithm.sha256, "sc"),
        int(source.get("InstanceNumber", 1) or 1), MANUFACTURER, patient_orientation=("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "pneumoscan Grad-CAM (AI screening aid)"
    sc.ImageComments = SC_CAPTION
    return sc
