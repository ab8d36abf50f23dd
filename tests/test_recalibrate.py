"""Recalibration from reads on fixed logits: the sensitivity floor holds out of fold."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.core import metrics
from pneumoscan.evaluation import recalibrate


def site(n_patients=150):
    """Deterministic raw logits of a model whose ranking is good but whose cut is off: normals sit
    too high (a third above 0), as the bundled model on the later collection."""
    k = np.arange(n_patients)
    y = (k % 5 < 3).astype(int)  # 0.6 PNEUMONIA
    grid = ((k * 37) % n_patients + 0.5) / n_patients  # a fixed permutation of quantile levels
    from scipy.stats import norm
    raw = np.where(y == 1, 3.0 + 1.2 * norm.ppf(grid), 0.6 + 1.2 * norm.ppf(grid))
    return raw, y, np.array([f"p{i}" for i in k])


@pytest.mark.slow  # a few seconds; make test runs it
def test_floor_holds_out_of_fold_and_reports_its_cost():
    raw, y, clusters = site()
    r = recalibrate.recalibrate(raw, y, clusters, floor=0.95, n_resamples=300)
    assert r["final"]["threshold"] > metrics.sigmoid(0.0)  # moved up from the old 0.5 cut
    sens = r["out_of_fold"]["sensitivity"]
    assert sens["value"] >= 0.9 and sens["ci"][0] < sens["value"] < sens["ci"][1]
    assert r["specificity_cost"] >= 0
    assert r["reads_needed"]["specificity"]["more_reads"] > 0  # 60 normals are too few for ±0.05
    text = recalibrate.summary(r)
    assert "out-of-fold" in text and "more reads" in text


def test_too_few_patients_is_a_clear_error():
    raw, y, clusters = site(12)
    with pytest.raises(Exception, match="collect more reads"):
        recalibrate.recalibrate(raw[:6], y[:6], clusters[:6], floor=0.95)


def test_saved_model_records_the_temperature_its_weights_apply(tmp_path):
    """The bundled model keeps its temperature in fp16: meta, card and the floor must use that value,
    not the unrounded fit (which a float16 buffer cannot hold)."""
    import torch

    from pneumoscan.core import calibration
    from pneumoscan.modeling import artifact
    from pneumoscan.serve.card import model_card

    raw, y, clusters = site()
    unrounded = calibration.fit_temperature(raw, y)
    assert float(torch.tensor(unrounded, dtype=torch.float16)) != unrounded  # else this test proves nothing
    dtype = recalibrate.temperature_dtype(artifact.BUNDLED_MODEL)
    assert dtype == torch.float16
    r = recalibrate.recalibrate(raw, y, clusters, floor=0.95, n_resamples=50, dtype=dtype)
    out = tmp_path / "m2.pt"
    recalibrate.save_model(artifact.BUNDLED_MODEL, out, r, "test reads")
    blob = artifact.read(out)
    applied = float(blob["state_dict"]["temperature"].float())  # what the loaded model divides by
    meta = artifact.ModelMeta.from_dict(blob["meta"])
    assert meta.temperature == applied == r["final"]["temperature"]
    assert model_card(meta, sha256="x", runtime="torch")["temperature"] == applied
    # the threshold was fitted on the probabilities the model gives: the floor holds on them
    prob = metrics.sigmoid(raw / applied)
    assert np.mean(prob[y == 1] >= meta.threshold) >= 0.95
    # a fit that ignored the buffer's precision is refused rather than written with a mismatch
    with pytest.raises(ValueError, match="temperature_dtype"):
        recalibrate.save_model(artifact.BUNDLED_MODEL, tmp_path / "m3.pt",
                               recalibrate.recalibrate(raw, y, clusters, floor=0.95, n_resamples=50), "test reads")
