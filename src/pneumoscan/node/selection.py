"""Which received instances are scored, and the recorded reason for each one that is not.

The model reads one frontal chest radiograph as displayed. A lateral view, a CT slice, a
secondary capture (a screenshot, perhaps with burned-in text), a derived image or raw
"for processing" detector data would all still get a confident probability, so they are
recorded with a reason and left alone. Rules are data (``Rules``) so a site can widen them
(e.g. a vendor that writes Modality "DR"), and an empty ViewPosition or BodyPartExamined is
accepted: many CR units leave them blank.

Reasons may quote technical attribute values (a modality, a view code); they go to the store
and into the result document, never into logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from pydicom.uid import UID

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
SCORED_CLASSES = (CR, DX_PRESENTATION)
# accepted only so that the node can record why they are not scored (a PACS forwards whole studies)
RECORDED_CLASSES = (DX_PROCESSING, CT, SC)
LATERAL = ("LL", "RL", "LLD", "RLD", "LAT", "LATERAL")


@dataclass(frozen=True)
class Rules:
    modalities: tuple[str, ...] = ("CR", "DX")
    views: tuple[str, ...] = ("PA", "AP")
    body_parts: tuple[str, ...] = ("CHEST",)
    allow_empty_view: bool = True
    allow_empty_body_part: bool = True


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value or "").strip().upper()[:16]


def reason_not_scored(ds: pydicom.Dataset, rules: Rules = Rules()) -> str | None:
    """None when ``ds`` (a header, pixel data optional) is a film to score, else why not."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in SCORED_CLASSES:
        name = UID(sop_class).name if sop_class else "missing"
        return f"SOP class {name}: not a chest radiograph for presentation"
    modality = _text(ds, "Modality")
    if modality not in rules.modalities:
        return f"modality {modality or 'missing'}: not one of {'/'.join(rules.modalities)}"
    image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    if image_type and image_type[0] == "DERIVED" or "SECONDARY" in image_type[1:2]:
        return "derived or secondary image (ImageType): not an original acquisition"
    view = _text(ds, "ViewPosition")
    if view in LATERAL:
        return f"lateral view (ViewPosition {view}): the model reads frontal films only"
    if view and view not in rules.views or not view and not rules.allow_empty_view:
        return f"view {view or 'missing'}: not one of {'/'.join(rules.views)}"
    part = _text(ds, "BodyPartExamined")
    if part and part not in rules.body_parts or not part and not rules.allow_empty_body_part:
        return f"body part {part or 'missing'}: not one of {'/'.join(rules.body_parts)}"
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        return "unusable NumberOfFrames"
    if frames > 1:
        return f"multi-frame object ({frames} frames): expected one radiograph"
    if "PixelData" not in ds:
        return "no pixel data (not an image)"
    return None
