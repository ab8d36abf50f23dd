"""The calibration prior a model records must be what its probabilities are calibrated at.

The bundled model recorded 0.9969 (a nan objective in the intercept fit: validation films whose
probability rounded to 1.0 became +inf logits); EM from it found 0.43 on the model's own validation
films, whose PNEUMONIA share is 0.743. These tests fail on that file and pin the repair.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.core import calibration
from pneumoscan.modeling import artifact
from pneumoscan.training import calibrate as train_calibrate

# the bundled weights before the repair (tools/repair_prior.py rewrites only the meta)
BUNDLED_STATE_FINGERPRINT = "3a25b86c299362b15df352b072cc53925ced56448311a30dabf20dc6e2af6208"


def state_fingerprint(path) -> str:
    state = artifact.read(path)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].cpu().numpy().tobytes())
    return h.hexdigest()


def test_bundled_prior_is_consistent_with_its_validation_films():
    prior = artifact.read_meta(artifact.BUNDLED_MODEL).prior
    ref = prior["validation"]
    assert ref["n"] == prior["n_calibration"] == 522
    # plausible: between the balanced-training prior and the films' share, not at the edge of (0, 1)
    assert 0.3 < prior["effective"] < prior["calibration"]
    # EM from the recorded prior on validation-like films finds their share (0.743) again
    assert calibration.em_consistency(ref, prior["effective"]) == pytest.approx(prior["calibration"], abs=0.02)
    # ...which the old record did not: it found 0.43 (the 0.41 underestimate)
    assert calibration.em_consistency(ref, 0.9969346549624343) < 0.5


def test_repair_kept_the_weights():
    assert state_fingerprint(artifact.BUNDLED_MODEL) == BUNDLED_STATE_FINGERPRINT
    meta = artifact.read_meta(artifact.BUNDLED_MODEL)
    assert meta.logit_offset == 0.0 and meta.temperature == pytest.approx(0.9017153382301331, abs=1e-12)


def test_bundled_onnx_document_matches_model():
    onnx = pytest.importorskip("onnx")
    from pneumoscan.core.files import file_sha256
    from pneumoscan.inference.onnx_format import get_document

    doc = get_document(onnx.load(str(artifact.BUNDLED_MODEL.with_suffix(".onnx")), load_external_data=False))
    assert doc["source_sha256"] == file_sha256(artifact.BUNDLED_MODEL)
    assert doc["meta"]["prior"] == artifact.read_meta(artifact.BUNDLED_MODEL).prior


def test_calibration_prior_survives_probabilities_that_round_to_one():
    """The old cause: logit(sigmoid(z)) is +inf for z > ~37; the prior comes from the logits now."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(150, int), np.ones(350, int)]
    z = np.where(y == 1, rng.normal(2.5, 1.5, y.size), rng.normal(-2.5, 1.5, y.size))
    z[np.flatnonzero(y == 1)[:9]] = 500.0  # confident films, as in the bundled model's validation split
    prior = train_calibrate.calibration_prior(y, z, "validation split")
    truth = calibration.effective_prior(np.clip(z, -50, 50), y)
    assert prior["effective"] == pytest.approx(truth, abs=1e-6)
    assert calibration.em_consistency(prior["validation"], prior["effective"]) == pytest.approx(0.7, abs=0.02)
    with pytest.raises(ValueError):
        calibration.fit_intercept(np.r_[np.nan, z[1:]], y)


@pytest.mark.slow
def test_adapt_without_labels_on_the_sample_gives_a_small_offset(tmp_path):
    """115 of the sample's 200 films are PNEUMONIA (0.575): the estimate covers it and the offset is
    small (it was -6.1 with the old record)."""
    out = tmp_path / "adapted.pt"
    run = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "adapt", "--images", "examples/chest_xray_sample",
                          "--out", str(out), "--bootstrap", "100"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    prior = artifact.read_meta(out).prior
    assert abs(prior["logit_offset"]) < 0.5
    assert prior["ci"][0] < 0.575 < prior["ci"][1]
