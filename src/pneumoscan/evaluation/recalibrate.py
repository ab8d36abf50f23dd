"""Recalibration from a site's reads: temperature, threshold (with a sensitivity floor) and UNSURE
band re-fitted on the films radiologists have read (``pneumoscan adapt --db``).

On a held-back collection of the same hospital's children the bundled model kept its ranking
(ROC-AUC 0.97) but not its cut (specificity 0.67); re-fitting on 60 local labelled films raised
specificity to about 0.90 on other patients. This does that on the reads the store collected:

* the threshold is the highest that keeps the site sensitivity >= ``floor`` on the read films
  (``calibration.choose_threshold`` rule ``sensitivity:<floor>``): the most specificity the floor
  allows (set midway to the next lower fitted probability, so no film sits exactly on the cut);
  the report says what specificity it costs against the Youden point;
* the numbers reported for the recalibrated model are **out-of-fold**: patient-grouped k-fold
  cross-fitting, each fold's films scored by a recalibration fitted on the other patients only;
  their 95% CIs come from the cluster bootstrap of ``site_report``;
* how many more reads would bring each rate's 95% CI to ±``halfwidth`` (Wilson; per class, at the
  site's prevalence).

The final model is fitted on all read films, as a new file (a new sha256) whose meta records its
parent; ``commands`` registers it in the store.
"""

from __future__ import annotations

import math

import numpy as np

from pneumoscan.core import calibration, conformal, metrics
from pneumoscan.core.errors import UserError
from pneumoscan.evaluation.site_report import cluster_bootstrap

DEFAULT_FLOOR = 0.95
HALF_WIDTH = 0.05


def below_the_cut(prob: np.ndarray, threshold: float) -> float:
    """``threshold`` lowered to midway to the next lower fitted probability: the same decisions on
    the fitted films, but the film the floor hinges on no longer sits exactly on the cut, where the
    new model's own float32 (and fp16-temperature) arithmetic could drop it below and break the floor."""
    lower = prob[prob < threshold]
    return float((threshold + lower.max()) / 2) if lower.size else threshold


def as_stored(temperature: float, dtype=None) -> float:
    """``temperature`` as a model whose temperature buffer has torch ``dtype`` divides by it (the
    bundled model keeps it in fp16: 0.90185546875, not the fitted 0.9018...). The threshold, band,
    meta and card must all use this value, else the model's scores sit a rounding away from them."""
    if dtype is None:
        return float(temperature)
    import torch

    return float(torch.tensor(float(temperature), dtype=dtype))


def temperature_dtype(model_path):
    """The torch dtype the model file at ``model_path`` keeps its temperature in."""
    from pneumoscan.modeling import artifact

    return artifact.read(model_path)["state_dict"]["temperature"].dtype


def fit(raw: np.ndarray, y: np.ndarray, floor: float, confidence: float | None, dtype=None) -> dict:
    """Temperature (as a ``dtype`` buffer holds it), threshold at the sensitivity floor and UNSURE
    band on raw (pre-temperature) logits."""
    temperature = as_stored(calibration.fit_temperature(raw, y), dtype)
    prob = metrics.sigmoid(raw / temperature)
    threshold = below_the_cut(prob, calibration.choose_threshold(y, prob, f"sensitivity:{floor:g}"))
    band = conformal.conformal_band(y, prob, confidence, threshold) if confidence else None
    return {"temperature": temperature, "threshold": threshold, "band": band,
            "youden": calibration.choose_threshold(y, prob, "youden")}


def _folds(y: np.ndarray, clusters: np.ndarray, k: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    for label, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
        n = len(set(clusters[y == label]))
        if n < k:
            raise UserError(f"recalibration needs read films of at least {k} patients per class; {name} has {n}: "
                            "collect more reads")
    return StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(y.size), y, clusters)


def cross_fitted(raw, y, clusters, *, floor: float, confidence: float | None, k: int = 5, seed: int = 0,
                 dtype=None) -> dict:
    """Out-of-fold probabilities, decisions (floor and Youden) and UNSURE flags of every read film."""
    prob, pred, youden, unsure = (np.zeros(y.size), np.zeros(y.size, bool), np.zeros(y.size, bool),
                                  np.zeros(y.size, bool))
    for train, test in _folds(y, clusters, k, seed):
        f = fit(raw[train], y[train], floor, confidence, dtype)
        prob[test] = metrics.sigmoid(raw[test] / f["temperature"])
        pred[test] = prob[test] >= f["threshold"]
        youden[test] = prob[test] >= f["youden"]
        if f["band"]:
            unsure[test] = conformal.in_band(prob[test], f["band"]["low"], f["band"]["high"])
    return {"prob": prob, "pred": pred, "youden": youden, "unsure": unsure}


def reads_needed(n_pos: int, n_neg: int, sens: float, spec: float, halfwidth: float = HALF_WIDTH) -> dict:
    """More read films (all classes, at the site's prevalence) for each rate's CI to reach ±halfwidth."""
    share = n_pos / max(n_pos + n_neg, 1)
    out = {}
    for name, have, rate, frac in (("sensitivity", n_pos, sens, share), ("specificity", n_neg, spec, 1 - share)):
        need = metrics.films_for_halfwidth(halfwidth, rate if 0 < rate < 1 else 0.95)
        out[name] = {"class_films_needed": need, "more_reads": 0 if have >= need or frac <= 0
                     else int(math.ceil((need - have) / frac)), "halfwidth": halfwidth}
    return out


def recalibrate(raw, y, clusters, *, floor: float = DEFAULT_FLOOR, confidence: float | None = 0.95, k: int = 5,
                n_resamples: int = 1000, seed: int = 0, dtype=None) -> dict:
    """The final fit on all read films, and its out-of-fold report; ``dtype`` is the torch dtype of
    the model's temperature buffer (``temperature_dtype``), so every fit uses the value it applies."""
    raw, y, clusters = np.asarray(raw, float), np.asarray(y, int), np.asarray(clusters, str)
    if not 0 < floor <= 1:
        raise UserError(f"--sensitivity-floor must be in (0, 1], got {floor}")
    final = fit(raw, y, floor, confidence, dtype)
    oof = cross_fitted(raw, y, clusters, floor=floor, confidence=confidence, k=k, seed=seed, dtype=dtype)
    at_floor = cluster_bootstrap(y, oof["prob"], oof["pred"], clusters, n_resamples=n_resamples, seed=seed)
    at_youden = cluster_bootstrap(y, oof["prob"], oof["youden"], clusters, n_resamples=n_resamples, seed=seed)
    decided = ~oof["unsure"]
    sens, spec = at_floor["sensitivity"]["value"], at_floor["specificity"]["value"]
    return {"final": final, "floor": floor, "n": int(y.size), "n_clusters": int(np.unique(clusters).size),
            "folds": k, "out_of_fold": at_floor, "out_of_fold_youden": at_youden,
            "specificity_cost": at_youden["specificity"]["value"] - spec,
            "unsure_rate": float(oof["unsure"].mean()),
            "decided_accuracy": float((oof["pred"][decided] == y[decided]).mean()) if decided.any() else math.nan,
            "reads_needed": reads_needed(int(y.sum()), int((y == 0).sum()), sens, spec),
            "share": float(y.mean()), "effective": calibration.effective_prior(raw / final["temperature"], y),
            "reference": calibration.validation_reference(raw / final["temperature"], y)}


def summary(r: dict) -> str:
    """What ``pneumoscan adapt --db`` prints."""
    o = r["out_of_fold"]

    def ci(m):
        return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"

    need = r["reads_needed"]
    return "\n".join([
        f"recalibrated on {r['n']} read films of {r['n_clusters']} patients: temperature "
        f"{r['final']['temperature']:.3f}, threshold {r['final']['threshold']:.4f} (sensitivity floor {r['floor']:g})",
        f"out-of-fold ({r['folds']} patient-grouped folds; 95% CI, cluster bootstrap): sensitivity "
        f"{ci(o['sensitivity'])}, specificity {ci(o['specificity'])}, accuracy {ci(o['accuracy'])}, ROC-AUC "
        f"{ci(o['roc_auc'])}",
        f"the floor costs {r['specificity_cost']:+.3f} specificity against the Youden point "
        f"({ci(r['out_of_fold_youden']['specificity'])}); UNSURE rate {r['unsure_rate']:.3f}, accuracy on decided "
        f"films {r['decided_accuracy']:.3f}",
        f"to narrow sensitivity to ±{need['sensitivity']['halfwidth']:g}: about {need['sensitivity']['more_reads']} "
        f"more reads; specificity: about {need['specificity']['more_reads']} more reads"])


def save_model(model_path, out, r: dict, source: str) -> str:
    """Write the recalibrated copy of ``model_path`` to ``out`` (state_dict as read, temperature
    replaced; meta with the new threshold, band and prior, and its parent's sha256); returns the new
    file's sha256. The input file is never written. ``r`` must come from ``recalibrate(...,
    dtype=temperature_dtype(model_path))``: meta and weights then hold the same temperature."""
    from pathlib import Path

    import torch

    from pneumoscan.core.files import atomic_path, file_sha256
    from pneumoscan.modeling import artifact

    model_path, out = Path(model_path), Path(out)
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out} is the input model; recalibration writes a new version")
    blob = artifact.read(model_path)
    meta = artifact.ModelMeta.from_dict(blob["meta"])
    f = r["final"]
    state = dict(blob["state_dict"])
    dtype = state["temperature"].dtype
    temperature = as_stored(f["temperature"], dtype)
    if temperature != f["temperature"]:  # fitted without the dtype: its threshold would not match the model
        raise ValueError(f"the fit's temperature {f['temperature']!r} is not what a {dtype} buffer holds "
                         f"({temperature!r}): recalibrate with dtype=temperature_dtype(model)")
    state["temperature"] = torch.tensor(temperature, dtype=dtype)
    band = None if f["band"] is None else f["band"] | {"rule": (meta.unsure or {}).get("rule", "conformal:0.95"),
                                                       "fitted_on": source}
    prior = {"calibration": r["share"], "effective": r["effective"], "n_calibration": r["n"],
             "calibration_source": source, "validation": r["reference"],
             "recalibrated": {"parent_sha256": file_sha256(model_path), "sensitivity_floor": r["floor"],
                              "out_of_fold": {k: r["out_of_fold"][k] for k in ("sensitivity", "specificity",
                                                                                "accuracy", "roc_auc")}}}
    new = meta.replace(temperature=temperature, threshold=f["threshold"],
                       threshold_rule=f"sensitivity:{r['floor']:g}", unsure=band, prior=prior)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:  # a file object: the sha256 must not depend on the temp name
            torch.save({"format": artifact.FORMAT, "meta": new.to_dict(), "state_dict": state}, fh)
    return file_sha256(out)
