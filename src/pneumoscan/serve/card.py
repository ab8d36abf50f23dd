"""The model card the service shows: what the loaded model is, and what it must not be used for.

Every fact is read from the artifact's ``meta``; the intended use and the limitations are fixed
text because they follow from the training data (one paediatric centre), not from a run.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

INTENDED_USE = (
    "Screening aid and second opinion for chest X-rays: it sorts a worklist so the most suspicious "
    "images are read first. It is not a diagnosis; a radiologist must review every image."
)

LIMITATIONS = [
    "Trained on paediatric chest X-rays (children aged 1-5) from a single centre (Guangzhou Women and "
    "Children's Medical Center; Kermany et al. 2018): adults, other hospitals, scanners and "
    "projections are outside the training distribution.",
    "Two classes only (NORMAL vs PNEUMONIA): it does not detect other findings, and it does not tell "
    "bacterial from viral pneumonia.",
    "Images are squashed to a square of the model's input size; the aspect ratio is not kept.",
    "The threshold was chosen on validation data; the probability is calibrated (temperature "
    "scaling) on that same data and may be off on other populations.",
    "Grad-CAM overlays show where the model looked, not where the pathology is.",
]


def model_card(meta: dict[str, Any], *, sha256: str, runtime: str) -> dict[str, Any]:
    config = meta.get("config", {})
    data_config = config.get("data", {})
    training = meta.get("training", {})
    weights_source = (meta.get("backbone_weights") or {}).get("source")
    return {
        "name": meta.get("architecture"),
        "sha256": sha256,
        "runtime": runtime,
        "pneumoscan_version": meta.get("pneumoscan_version"),
        "architecture": meta.get("architecture"),
        "head": meta.get("head"),
        "image_size": meta.get("image_size"),
        "input": meta.get("input"),
        "normalization": meta.get("normalization", {}).get("name"),
        "class_names": meta.get("class_names"),
        "output": meta.get("output"),
        "threshold": meta.get("threshold"),
        "threshold_rule": meta.get("threshold_rule"),
        "temperature": meta.get("temperature"),
        "training_data": {
            # the folder name only: the server's paths are none of the client's business
            "dataset": PurePath(data_config["root"]).name if data_config.get("root") else None,
            "n_train": training.get("n_train"),
            "n_val": training.get("n_val"),
            "augment": data_config.get("augment"),
            "class_weights": data_config.get("class_weights"),
            "backbone_weights": PurePath(weights_source).name if weights_source else None,
            "epochs_run": training.get("epochs_run"),
            "best_epoch": training.get("best_epoch"),
        },
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }
