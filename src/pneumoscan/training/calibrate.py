"""Fitting on validation after training: the UNSURE band, the calibration prior and the
out-of-distribution detector that ``train.finalize`` and ``ensemble.combine`` attach to a model."""

from __future__ import annotations

import logging

import numpy as np

from pneumoscan.core import calibration, conformal, rules
from pneumoscan.modeling import models, shifts
from pneumoscan.safety import ood
from pneumoscan.training import features

log = logging.getLogger(__name__)


def fit_unsure(y: np.ndarray, prob: np.ndarray, threshold: float, rule: str) -> dict | None:
    """The UNSURE band for ``ModelMeta.unsure`` from calibrated validation probabilities (rule
    ``conformal:<confidence>``, see ``conformal.conformal_band``), or None for rule ``none``. Fitted
    after the temperature and the threshold, on the same films: the band is of the probabilities
    the model will output, and contains the threshold it will use."""
    confidence = rules.parse_unsure(rule)
    if confidence is None:
        return None
    if len(set(np.asarray(y).tolist())) < 2:
        log.warning("no UNSURE band: the validation split has a single class")
        return None
    band = conformal.conformal_band(y, prob, confidence, threshold)
    unsure = conformal.in_band(prob, band["low"], band["high"])
    log.info("UNSURE band [%.4f, %.4f) (Mondrian conformal, %g confidence, %d validation films): %d of them "
             "UNSURE", band["low"], band["high"], confidence, len(y), int(unsure.sum()))
    return band | {"rule": rule, "fitted_on": "validation split"}


def calibration_prior(y: np.ndarray, logits: np.ndarray, source: str) -> dict:
    """``ModelMeta.prior`` at training time: the PNEUMONIA share of the films the temperature was
    fitted on, the prevalence the calibrated probabilities are really posteriors at
    (``calibration.effective_prior``, where ``adapt`` shifts from) and the validation reference the
    drift monitor compares a site's films with (``calibration.validation_reference``).

    ``logits`` must be the calibrated logits themselves, not logit(sigmoid(...)) of them: a film
    whose probability rounds to 1.0 became +inf, the intercept fit's objective nan, and the bundled
    model recorded an effective prior of 0.997 instead of 0.553 (docs/pilot.md)."""
    y = np.asarray(y).astype(int)
    logits = np.asarray(logits, dtype=np.float64)
    return {"calibration": float(y.mean()), "effective": calibration.effective_prior(logits, y),
            "n_calibration": int(y.size), "calibration_source": source,
            "validation": calibration.validation_reference(logits, y)}


def fit_ood(model: models.Classifier, split_data: dict, *, seed: int, k: int | None = None) -> dict | None:
    """Fit the out-of-distribution detector on the trained model's own features and attach it
    as ``model.ood_head``; returns its description for ``ModelMeta.ood``.

    The covariance spans the training films plus shifted copies of a quarter of them (exposure,
    blur, noise, compression, borders, text): fitted on the films alone, it flagged 18.5% of mildly
    shifted held-out films, with them 1.7% (benchmarks/ood.md). The cut-offs come from validation
    films, patients the fit never saw; with fewer than ``ood.MIN_VALIDATION`` of them there is no
    detector (and the model card says so), since the cut-off would be noise.
    """
    (train_samples, train_images), (_, val_images) = split_data["train"], split_data["val"]
    if len(val_images) < ood.MIN_VALIDATION:
        log.warning("no out-of-distribution detector: %d validation films, at least %d are needed for its "
                    "cut-off", len(val_images), ood.MIN_VALIDATION)
        return None
    labels = np.array([s.label for s in train_samples])
    shifted, source = shifts.shifted_views(train_images, max(1, len(train_images) // 4), seed=seed)
    fit_images = np.concatenate([train_images, shifted])
    runner = features.embedding_runner(model, fit_images.shape[-1])  # one export for both passes
    state = ood.fit(features.embed(model, fit_images, runner=runner).numpy(), np.concatenate([labels, labels[source]]),
                    features.embed(model, val_images, runner=runner).numpy(), feature_source="model.embed", k=k)
    model.ood_head = ood.torch_module(state)
    return ood.describe(state)
