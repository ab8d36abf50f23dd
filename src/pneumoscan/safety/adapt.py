"""Prevalence adaptation: a model's probabilities re-based on a site's pneumonia prevalence.

A model's calibrated probabilities assume the prevalence of the films its temperature was fitted
on (the validation split, ``ModelMeta.prior["calibration"]``). At a site where pneumonia is rarer
or commoner, the same film deserves another posterior. Under label shift (the look of a NORMAL and
of a PNEUMONIA film unchanged, only their mix) Bayes' rule gives it exactly: add
Δ = logit(π_site) - logit(π_calibration) to every logit. ``adapt`` estimates π_site from the
site's *unlabelled* films by EM (Saerens, Latinne & Decaestecker 2002; ``calibration.em_prior``),
with a bootstrap 95% CI, and writes a copy of the model whose meta carries Δ
(``ModelMeta.prior["logit_offset"]``); ``ModelMeta.site_logits`` applies it wherever a
probability is made (decide, the engines' ``predict_proba``, explain), so predict, evaluate,
serve and the ONNX export of the copy all see the site's probabilities. An exported ``.onnx`` is
adapted the same way (its metadata document changes, its graph does not).

What moves with Δ and what does not:

* a threshold chosen for a prevalence-independent target (rule ``youden`` or ``sensitivity:X``)
  was a point on the ROC curve, i.e. a *logit*: the same films must stay above it, so it keeps
  its logit and its probability moves, sigmoid(logit(t) + Δ);
* a plain probability cut (``0.5``, the Bayes / accuracy rule) means "call PNEUMONIA when it is
  the likelier class": that is a statement about the posterior, so it stays in probability space
  and now cuts the shifted posteriors, moving the operating point as the prevalence asks;
* the UNSURE band is class-conditional conformal (each class's own quantile), which does not
  depend on the prevalence: its edges keep their logits, and the band is widened again to
  contain the (possibly unmoved) threshold.

The prior EM starts from is ``ModelMeta.prior["effective"]``, the prevalence the calibrated
probabilities really are posteriors at (``calibration.effective_prior``); with balanced class weights
and temperature scaling (no intercept) it was 0.47 for a validation split of 0.74 PNEUMONIA, and
starting from 0.74 made EM biased and the adaptation harmful (benchmarks/adapt.md).

With ``labels`` (a folder of the site's labelled films) the temperature, the threshold (the
model's own rule) and the UNSURE band are re-fitted on them instead of being carried over from
validation; their PNEUMONIA share becomes the calibration prior that the EM estimate shifts from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.modeling import artifact
from pneumoscan.io import data, imaging
from pneumoscan.core import calibration as calib  # "calibration" names the calibration prior below
from pneumoscan.core import conformal, metrics
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path
from pneumoscan.safety import decision

log = logging.getLogger(__name__)

HALF_WIDTH = 0.05  # the precision the labelled-film warning is stated for (Wilson 95% CI half-width)


def moves_with_prior(rule: str) -> bool:
    """Whether a threshold rule keeps its logit under a prior shift (see the module docstring)."""
    rule = str(rule).strip()
    return rule == "youden" or rule.startswith("sensitivity:")


def shift(prob: float, delta: float) -> float:
    """A probability with its logit moved by ``delta`` (0 and 1 stay put)."""
    return float(metrics.sigmoid(metrics.logit(prob) + delta))


def calibration_prior(meta: ModelMeta, train_prior: float | None) -> tuple[float, str]:
    """The prevalence the model's probabilities are posteriors at, and where it was read from:
    ``prior["effective"]`` (``calibration.effective_prior``, recorded since training stores it), else the
    calibration films' PNEUMONIA share (exact only if their calibration had no intercept error)."""
    if train_prior is not None:
        if not 0 < train_prior < 1:
            raise UserError(f"--train-prior must be in (0, 1), got {train_prior}")
        return float(train_prior), "--train-prior"
    if meta.prior and "effective" in meta.prior:
        return float(meta.prior["effective"]), (f"{meta.prior.get('calibration_source', 'model meta')}: the prevalence "
                                                "its probabilities are posteriors at")
    if meta.prior and "calibration" in meta.prior:
        return float(meta.prior["calibration"]), str(meta.prior.get("calibration_source", "model meta"))
    counts = (meta.unsure or {}).get("class_counts")
    if counts and sum(counts.values()):
        return counts["PNEUMONIA"] / sum(counts.values()), "the UNSURE band's calibration films"
    raise UserError("this model does not record the prevalence its probabilities were calibrated at (it predates "
                    "ModelMeta.prior); give it with --train-prior P (the PNEUMONIA share of its validation split)")


def score(engine, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, int]:
    """(the model's calibrated logits of the films it is competent for, their indexes among the
    decoded files, how many it was not competent for). Films the input gate or the OOD detector
    refuse say nothing about the site's prevalence and are left out."""
    meta = engine.meta
    decoded = imaging.decode_many(paths, meta.image_size)
    if not decoded.kept:
        raise UserError("none of the images could be read")
    logits, ood, chest_logits = engine.score_all(decoded.images)
    verdicts = decision.decide(meta.replace(prior=None, unsure=None), logits, ood,
                               decision.check_inputs(meta, decoded.images, decoded.sizes), chest_logits=chest_logits)
    competent = np.array([v.assessed for v in verdicts], dtype=bool)
    return np.asarray(logits, dtype=np.float64)[competent], np.flatnonzero(competent), int((~competent).sum())


def refit_on_labels(engine, labels: str | Path, meta: ModelMeta) -> dict[str, Any]:
    """Temperature, threshold (the model's rule) and UNSURE band fitted on a site's labelled films."""
    samples = data.scan(labels)
    kept, decoded = data.decode_samples(samples, meta.image_size)
    y = np.array([s.label for s in kept])
    if len(set(y.tolist())) < 2:
        raise UserError(f"{labels}: re-fitting needs both NORMAL and PNEUMONIA films")
    raw = np.asarray(engine.assess(decoded.images)[0], dtype=np.float64) * meta.temperature  # before any temperature
    temperature = calib.fit_temperature(raw, y)
    prob = metrics.sigmoid(raw / temperature)
    threshold = calib.choose_threshold(y, prob, meta.threshold_rule)
    confidence = (meta.unsure or {}).get("confidence")
    band = conformal.conformal_band(y, prob, float(confidence), threshold) if confidence else None
    pred = prob >= threshold
    n_normal, n_pneumonia = int((y == 0).sum()), int((y == 1).sum())
    spec = float((~pred[y == 0]).mean())
    sens = float(pred[y == 1].mean())
    need = {"NORMAL": metrics.films_for_halfwidth(HALF_WIDTH, spec if spec < 1 else 0.95),
            "PNEUMONIA": metrics.films_for_halfwidth(HALF_WIDTH, sens if sens < 1 else 0.95)}
    warnings = []
    for name, have, rate, what in (("NORMAL", n_normal, spec, "specificity"), ("PNEUMONIA", n_pneumonia, sens,
                                                                                "sensitivity")):
        if have < need[name]:
            warnings.append(f"only {have} labelled {name} films: {what} {rate:.2f} at this threshold needs about "
                            f"{need[name]} for a Wilson 95% CI of ±{HALF_WIDTH:g}; the re-fitted threshold and band "
                            "are uncertain")
    for w in warnings:
        log.warning("%s", w)
    return {"temperature": temperature, "threshold": threshold, "band": band,
            "prior": calib.effective_prior(raw / temperature, y), "share": float(y.mean()),
            "n": int(y.size), "class_counts": {"NORMAL": n_normal, "PNEUMONIA": n_pneumonia},
            "films_needed": need, "warnings": warnings}


def adapted_meta(meta: ModelMeta, *, calibration: float, calibration_source: str, threshold0: float,
                 band0: dict | None, site: float, ci: tuple[float, float], n_images: int, extra: dict) -> ModelMeta:
    """The meta of the adapted copy: the prior record (``calibration`` the prevalence the offset
    starts from, kept as ``effective``), and the threshold and band on the shifted scale.
    ``threshold0`` and ``band0`` are on the calibration scale (kept in ``prior`` so that adapting an
    adapted model starts again from them, not from the already shifted values)."""
    delta = calib.prior_offset(site, calibration)
    threshold = shift(threshold0, delta) if moves_with_prior(meta.threshold_rule) else float(threshold0)
    unsure = None
    if band0 is not None:
        c_low, c_high = float(band0["conformal_low"]), float(band0["conformal_high"])
        s_low, s_high = shift(c_low, delta), shift(c_high, delta)
        low, high = conformal.band_with_threshold(s_low, s_high, threshold)
        unsure = {**band0, "conformal_low": s_low, "conformal_high": s_high, "low": low, "high": high,
                  "shifted_by_prior": delta}
    prior = {"calibration": float(calibration), **(meta.prior or {}), "effective": float(calibration),
             "calibration_source": calibration_source, "site": float(site),
             "ci": [float(ci[0]), float(ci[1])], "method": "em", "n_images": int(n_images), "logit_offset": delta,
             "calibration_threshold": float(threshold0),
             "calibration_band": None if band0 is None else {k: band0[k] for k in ("conformal_low", "conformal_high",
                                                                                  "low", "high")},
             "threshold_moves": moves_with_prior(meta.threshold_rule)} | extra
    return meta.replace(threshold=threshold, unsure=unsure, prior=prior)


def calibration_band(meta: ModelMeta) -> dict | None:
    """The model's UNSURE band on its calibration scale (before any earlier adaptation)."""
    if not meta.unsure:
        return None
    before = (meta.prior or {}).get("calibration_band")
    return {**meta.unsure, **before} if before else dict(meta.unsure)


def write_onnx(source: Path, out: Path, meta: ModelMeta) -> None:
    """A copy of the ONNX file ``source`` whose metadata document carries ``meta``; the graph is
    unchanged."""
    import onnx

    from pneumoscan.inference.onnx_format import get_document, set_document

    proto = onnx.load(str(source))
    document = get_document(proto, source)
    set_document(proto, document | {"meta": meta.to_dict()})
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def run(model_path: str | Path, images: str | Path, out: str | Path, *, labels: str | Path | None = None,
        train_prior: float | None = None, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write the adapted copy of ``model_path`` to ``out`` (the input is never written); returns
    the estimate and what changed."""
    import torch

    from pneumoscan.inference.engines import TorchEngine

    model_path, out = artifact.resolve(model_path), Path(out)
    onnx_input = model_path.suffix.lower() == ".onnx"
    if labels is not None and train_prior is not None:
        raise UserError("--train-prior and --labels exclude each other: with --labels the prior is fitted on the "
                        "labelled films")
    if onnx_input and labels is not None:
        raise UserError(f"{model_path}: --labels re-fits the temperature, which is inside the graph; adapt the "
                        "model.pt with --labels, then export the copy")
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out} is the input model; adapt writes a copy and never changes the input")
    if onnx_input != (out.suffix.lower() == ".onnx"):
        raise UserError(f"--out {out} must have the input's suffix ({model_path.suffix})")
    if onnx_input:
        from pneumoscan.inference.engines import OnnxEngine

        engine = OnnxEngine(model_path)
        blob = None
    else:
        blob = artifact.read(model_path)
        engine = TorchEngine(model_path)
    meta = engine.meta
    files = imaging.collect_files([images])
    logits, _, n_refused = score(engine, files)
    if not len(logits):
        raise UserError(f"{images}: the model is not competent for any of the films (all NOT_ASSESSED)")

    extra: dict[str, Any] = {"n_not_assessed": n_refused, "images": Path(images).name}
    state = dict(blob["state_dict"]) if blob is not None else {}
    if labels is not None:
        refit = refit_on_labels(engine, labels, meta)
        scale = meta.temperature / refit["temperature"]  # the unlabelled logits at the new temperature
        logits = logits * scale
        calibration, source = refit["prior"], f"labelled site films ({Path(labels).name})"
        threshold0, band0 = refit["threshold"], refit["band"]
        if band0 is not None:
            band0 |= {"rule": (meta.unsure or {}).get("rule"), "fitted_on": source}
        old = state["temperature"]
        state["temperature"] = torch.tensor(refit["temperature"], dtype=old.dtype)
        meta = meta.replace(temperature=refit["temperature"])
        extra |= {"n_calibration": refit["n"], "calibration_class_counts": refit["class_counts"],
                  "calibration": refit["share"],
                  "films_needed": refit["films_needed"], "refit_warnings": refit["warnings"]}
    else:
        calibration, source = calibration_prior(meta, train_prior)
        threshold0 = float((meta.prior or {}).get("calibration_threshold", meta.threshold))
        band0 = calibration_band(meta)
        if meta.prior and "n_calibration" in meta.prior:
            extra["n_calibration"] = meta.prior["n_calibration"]

    prob = metrics.sigmoid(logits)
    site, iterations = calib.em_prior(prob, calibration)
    ci = calib.em_prior_ci(prob, calibration, n_resamples=n_bootstrap, seed=seed)
    extra["em_iterations"] = iterations
    warnings = list(extra.get("refit_warnings", []))
    if not 0.01 < site < 0.99:
        warnings.append(f"the estimated prevalence {site:.3g} is at the edge of (0, 1): the model's scores may not "
                        "separate the classes on these films, and the offset would be extreme; check the films")
        log.warning("%s", warnings[-1])
    new = adapted_meta(meta, calibration=calibration, calibration_source=source, threshold0=threshold0, band0=band0,
                       site=site, ci=ci, n_images=len(logits), extra=extra)
    if onnx_input:
        write_onnx(model_path, out, new)
    else:
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:  # a file object, as artifact.save: the sha256 must not depend on the temp name
                torch.save({"format": artifact.FORMAT, "meta": new.to_dict(), "state_dict": state}, f)
    log.info("adapted %s -> %s: site prevalence %.3f [%.3f, %.3f] from %d films (calibration %.3f, %s); logit "
             "offset %+.3f; threshold %.4f -> %.4f", model_path, out, site, *ci, len(logits), calibration, source,
             new.logit_offset, meta.threshold, new.threshold)
    return {"model": str(model_path), "out": str(out), "site": site, "ci": list(ci), "n_images": len(logits),
            "n_not_assessed": n_refused, "calibration": calibration, "calibration_source": source,
            "logit_offset": new.logit_offset, "threshold_before": meta.threshold, "threshold": new.threshold,
            "threshold_moves": moves_with_prior(meta.threshold_rule),
            "unsure": None if new.unsure is None else [new.unsure["low"], new.unsure["high"]],
            "warnings": warnings}


def summary(result: dict[str, Any]) -> str:
    """What ``pneumoscan adapt`` prints."""
    lo, hi = result["ci"]
    lines = [f"site prevalence {result['site']:.3f} (95% CI {lo:.3f}-{hi:.3f}; EM, Saerens et al. 2002, on "
             f"{result['n_images']} unlabelled films" + (f", {result['n_not_assessed']} NOT_ASSESSED left out"
                                                         if result["n_not_assessed"] else "") + ")",
             f"calibration prevalence {result['calibration']:.3f} ({result['calibration_source']}); logit offset "
             f"{result['logit_offset']:+.3f}",
             f"threshold {result['threshold_before']:.4f} -> {result['threshold']:.4f} ("
             + ("keeps its logit: a prevalence-independent rule" if result["threshold_moves"]
                else "a probability cut: stays on the probability scale") + ")"]
    if result["unsure"]:
        lines.append(f"UNSURE band [{result['unsure'][0]:.4f}, {result['unsure'][1]:.4f})")
    lines.append(f"model: {result['out']}")
    return "\n".join(lines)
