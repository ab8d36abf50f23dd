"""The model card the service shows: what the loaded model is, and what it must not be used for.

Every fact is read from the artifact's ``meta``; the intended use and the limitations are fixed
text because they follow from the training data (one paediatric centre), not from a run.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.calibration import describe_rule

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
    "Grad-CAM overlays show where the model looked, not where the pathology is.",
    "Images that are not frontal chest films are flagged not_chest_xray by a chest-film detector (or "
    "low_quality by the input gate) and left NOT_ASSESSED; frontal chest films unlike the training films "
    "(e.g. adults') are flagged outside_training_population, NOT_ASSESSED unless the site policy is warn "
    "(see input_checks; rates on development sets in benchmarks/ood.md): a wrong study that resembles a "
    "chest film can still get a label.",
]


def model_card(meta: ModelMeta, *, sha256: str, runtime: str) -> dict[str, Any]:
    data_config = meta.config.get("data", {})
    weights_source = meta.backbone_weights.get("source")
    return {
        "name": meta.architecture,
        "sha256": sha256,
        "runtime": runtime,
        "pneumoscan_version": meta.pneumoscan_version,
        "architecture": meta.architecture,
        "head": meta.head,
        "image_size": meta.image_size,
        "input": meta.input,
        "normalization": meta.normalization.name,
        "class_names": list(meta.class_names),
        "output": meta.output,
        "threshold": meta.threshold,
        "threshold_rule": meta.threshold_rule,
        "threshold_source": describe_rule(meta.threshold_rule),
        "temperature": meta.temperature,
        "unsure": unsure_card(meta),
        "prevalence": prevalence_card(meta),
        "training_data": {
            # the folder name only: the server's paths are none of the client's business
            "dataset": PurePath(data_config["root"]).name if data_config.get("root") else None,
            "n_train": meta.training.n_train,
            "n_val": meta.training.n_val,
            "augment": data_config.get("augment"),
            "class_weights": data_config.get("class_weights"),
            "backbone_weights": PurePath(weights_source).name if weights_source else None,
            "epochs_run": meta.training.epochs_run,
            "best_epoch": meta.training.best_epoch,
        },
        "intended_use": INTENDED_USE,
        "limitations": limitations(meta),
        "input_checks": input_checks(meta),
        "members": members(meta),
    }


def members(meta: ModelMeta) -> list[dict[str, Any]]:
    """An ensemble's members (empty for a single model): what each is and how its logit was
    calibrated before the mean; no paths, which are the server's business."""
    return [{"architecture": m.architecture, "head": m.head, "normalization": m.normalization.name,
             "tf_same_padding": m.tf_same_padding, "temperature": m.temperature,
             "backbone_weights": PurePath(m.backbone_weights["source"]).name
             if m.backbone_weights.get("source") else None,
             "unfreeze_blocks": (m.config.get("model") or {}).get("unfreeze_blocks"),
             "model_sha256": m.source.get("model_sha256")} for m in meta.members]


def unsure_card(meta: ModelMeta) -> dict[str, Any] | None:
    """The UNSURE band: [low, high) on the calibrated probability, and how it was fitted."""
    u = meta.unsure
    if not u:
        return None
    return {"low": u["low"], "high": u["high"], "method": u.get("method"), "confidence": u.get("confidence"),
            "n_calibration": u.get("n_calibration"), "class_counts": u.get("class_counts"),
            "fitted_on": u.get("fitted_on"),
            "meaning": (f"a film with {u['low']:.4f} <= probability < {u['high']:.4f} is labelled UNSURE: its "
                        "class-conditional conformal prediction set is both classes (or none), so a reader, not the "
                        "model, decides it; the band contains the threshold, so every decided film agrees with it")}


def prevalence_card(meta: ModelMeta) -> dict[str, Any] | None:
    """The prevalence the probabilities assume, and the site adaptation (``pneumoscan adapt``) if any."""
    p = meta.prior
    if not p:
        return None
    out = {"calibration": p.get("calibration"), "calibration_source": p.get("calibration_source"),
           "n_calibration": p.get("n_calibration")}
    if "site" in p:
        out |= {"site": p["site"], "ci95": p.get("ci"), "method": p.get("method"), "n_images": p.get("n_images"),
                "logit_offset": p.get("logit_offset"),
                "meaning": (f"adapted to a site prevalence of {p['site']:.3f} (95% CI {p['ci'][0]:.3f}-{p['ci'][1]:.3f}), "
                            f"estimated by EM (Saerens et al. 2002) from {p['n_images']} unlabelled films: every logit "
                            f"is shifted by {p['logit_offset']:+.3f}")}
    return out


def flag_meanings() -> dict[str, str]:
    """Each flag's sentence (``decision.SENTENCES``, the one every face shows) and what it does to
    the label under the policy in force."""
    from pneumoscan.safety import decision

    blocking = decision.not_competent()
    effect = {True: "label NOT_ASSESSED", False: "the label is kept, read it with care"}
    out = {code: f"{decision.SENTENCES[code]}: {effect[code in blocking]}" for code in decision.FLAGS}
    out["low_quality"] = ("the input-quality gate refused the image (too small, extreme aspect ratio, near-constant, "
                          "too few grey levels, mostly black/white or noise-like): label NOT_ASSESSED")
    if decision.OUTSIDE_POPULATION not in blocking:
        out[decision.OUTSIDE_POPULATION] += f" ({decision.WARNED})"
    return out


def input_checks(meta: ModelMeta) -> dict[str, Any]:
    """What the model refuses to judge, and by which limits: the gate's, the chest-film detector's
    and the OOD cut-offs."""
    from pneumoscan.safety import decision, gate
    from pneumoscan.safety.decision import quality_limits

    o, c = meta.ood, meta.chest
    return {
        "flags": flag_meanings(),
        "outside_population_policy": decision.outside_policy(),
        "chest_detector": None if c is None else {
            "method": "logistic regression on the model's pooled ImageNet features: frontal chest films of children "
                      "and adults against other radiographs, lateral chests, other modalities and non-radiographs",
            "cutoff_logit": c["cutoff"], "rule": c.get("rule"), "fitted_on": c.get("fitted_on")},
        "quality_limits": gate.limits_table(quality_limits(meta)),
        "ood": None if o is None else {
            "method": "Mahalanobis distance of the model's pooled features (Lee et al. 2018), tied covariance "
                      "fitted on training films plus shifted copies",
            "cutoff_outside_training_population": o["cutoff_not_chest"], "cutoff_out_of_distribution": o["cutoff_ood"],
            "percentiles_of_validation": [o["percentile"], o["ood_percentile"]], "n_validation": o["n_val"]},
    }


def limitations(meta: ModelMeta) -> list[str]:
    return [*LIMITATIONS[:3], f"The decision threshold is {meta.threshold:.3f} ({describe_rule(meta.threshold_rule)}); "
            "the probability is calibrated (temperature scaling) on validation images from the training "
            "collection and may be off on other populations.", *LIMITATIONS[3:]]
