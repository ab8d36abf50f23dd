"""Regression pin: the bundled model's probabilities do not move when the code around it is refactored.

The numbers were computed from main at commit 39f901339fa20704b2f9bbfb4e980bd4fbfea865 (before the
pipeline refactor of issue 20) with ``load_engine(None, kind).predict_proba`` on films of
examples/chest_xray_sample, decoded by ``io.imaging.decode_many``. They are a pin, not a result:
six films say nothing about accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscan.inference.loading import load_engine
from pneumoscan.io import imaging

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chest_xray_sample"
PINNED = {  # film -> P(PNEUMONIA) per engine kind, at commit 39f9013
    "test/NORMAL/IM-0302-0001.jpeg": {"torch": 0.03686277821801326, "onnx": 0.03686311681121599},
    "test/NORMAL/IM-0346-0001.jpeg": {"torch": 4.597420521861566e-64, "onnx": 4.578658423698983e-64},
    "test/NORMAL/IM-0427-0001.jpeg": {"torch": 0.00458264572111766, "onnx": 0.0045826478962800515},
    "test/PNEUMONIA/person1072_bacteria_3006.jpeg": {"torch": 0.9999665099851219, "onnx": 0.9999665102725582},
    "test/PNEUMONIA/person1198_bacteria_3148.jpeg": {"torch": 0.9998894886648492, "onnx": 0.9998894885594688},
    "test/PNEUMONIA/person1240_bacteria_3196.jpeg": {"torch": 0.9999056103173167, "onnx": 0.9999056112173978},
}


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_bundled_model_probabilities_unchanged(kind):
    engine = load_engine(None, kind)
    films = [SAMPLE / name for name in PINNED]
    decoded = imaging.decode_many(films, engine.meta.image_size, warn=False)
    assert decoded.kept == list(range(len(films)))
    prob = engine.predict_proba(decoded.images)
    expected = np.array([PINNED[name][kind] for name in PINNED])
    np.testing.assert_allclose(prob, expected, rtol=0, atol=1e-6)
