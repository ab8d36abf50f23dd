"""``model.pt``: trained weights plus everything needed to use them.

The file is a plain dict of tensors and JSON-like values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs). Its ``meta`` says what the model
means (class names, image size, normalisation, temperature, decision threshold, training config,
versions); every loader builds the model from that record instead of re-declaring it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pneumoscan import CLASS_NAMES, __version__
from pneumoscan import models
from pneumoscan.errors import UserError
from pneumoscan.files import atomic_path

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-model/1"


def make_meta(*, architecture: str, head: str, image_size: int, weights_info: dict,
              threshold: float, threshold_rule: str, config: dict, extra: dict | None = None) -> dict[str, Any]:
    mean, std = models.NORMALIZATIONS[weights_info["normalization"]]
    meta = {
        "format": FORMAT,
        "architecture": architecture,
        "head": head,
        "image_size": image_size,
        "input": "grayscale in [0, 1], shape (N, 1, H, W); repeated to 3 channels inside the model",
        "normalization": {"name": weights_info["normalization"], "mean": list(mean), "std": list(std)},
        "tf_same_padding": bool(weights_info.get("tf_same_padding", False)),
        "backbone_weights": {"source": weights_info.get("source"), "sha256": weights_info.get("sha256")},
        "class_names": list(CLASS_NAMES),
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "output": "calibrated logit of PNEUMONIA (temperature applied inside the model); probability = sigmoid",
        "config": config,
        "pneumoscan_version": __version__,
        "torch_version": str(torch.__version__),
    }
    meta |= extra or {}
    return meta


def save(path: str | Path, model: models.Classifier, meta: dict, *, half: bool = False) -> Path:
    """``half`` stores float weights as fp16 (half the size, e.g. for the bundled model); loading
    always computes in fp32."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta = meta | {"temperature": float(model.temperature)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: torch.save would otherwise record the temp name,
            torch.save({"format": FORMAT, "meta": meta, "state_dict": state}, f)  # changing the sha256
    return Path(path)


def read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a loadable pneumoscan model ({exc.__class__.__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a pneumoscan model file (expected format {FORMAT})")
    return blob


def load(path: str | Path | None) -> tuple[models.Classifier, dict]:
    """The model in eval mode and its meta; ``None`` means the bundled model."""
    path = resolve(path)
    blob = read(path)
    meta = blob["meta"]
    model, _ = models.build(
        meta["architecture"], weights="none", head=meta["head"],
        normalization=meta["normalization"]["name"], tf_same_padding=meta["tf_same_padding"],
    )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    model.eval()
    log.debug("loaded %s (%s, threshold %.3f)", path, meta["architecture"], meta["threshold"])
    return model, meta


BUNDLED_MODEL = Path(__file__).parent / "assets" / "model.pt"


def resolve(path: str | Path | None) -> Path:
    """The model a command should use: the one given, else the model shipped with the package."""
    if path:
        return Path(path)
    if BUNDLED_MODEL.is_file():
        return BUNDLED_MODEL
    raise UserError("no --model given and this installation has no bundled model")
