"""predict: folders and files in, one row per readable image out, unreadable ones listed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray
from pneumoscan.commands import predict
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from pneumoscan.inference.loading import load_engine


def test_predict_files_rows_skips_and_threshold(trained_model, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "deep").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(synthetic_xray(rng, i % 2, 40)).save(tmp_path / "in" / "deep" / f"x{i}.png")
    (tmp_path / "in" / "bad.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    engine = load_engine(trained_model, "torch")
    rows, skipped = predict.predict_files(None, [tmp_path / "in"], engine=engine)
    assert [r.path.split("/")[-1] for r in rows] == ["x0.png", "x1.png", "x2.png"]
    assert [p.split("/")[-1] for p, _ in skipped] == ["bad.jpeg"] and "truncated" in skipped[0][1]
    sha = file_sha256(trained_model)
    for r in rows:
        assert 0 <= r.probability <= 1 and r.threshold == engine.meta.threshold and r.model_sha256 == sha
        assert r.prediction == int(r.probability >= r.threshold) and r.label == engine.meta.class_names[r.prediction]
    low, _ = predict.predict_files(None, [tmp_path / "in"], engine=engine, threshold=0.0)
    assert all(r.label == "PNEUMONIA" and r.threshold == 0.0 for r in low)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        predict.predict_files(None, [tmp_path / "empty"], engine=engine)


def test_only_unreadable_files_give_no_rows(trained_model, tmp_path):
    (tmp_path / "note.txt").write_text("not an x-ray")
    rows, skipped = predict.predict_files(trained_model, [tmp_path / "note.txt"], engine="torch")
    assert rows == [] and "not an image" in skipped[0][1]
