"""Two questions, two answers: "is this a frontal chest X-ray?" (``safety.chest``, flag
``not_chest_xray``) and "is it like the training films?" (``ood``, flag
``outside_training_population``). The decisions are pinned on fixed scores; the detector's path
through model.pt, PyTorch and ONNX Runtime on a small model with fixed weights; the bundled
model on held-out films of ../shared when it is there."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.core.errors import UserError
from pneumoscan.inference import onnx_export
from pneumoscan.inference.engines import OnnxEngine, TorchEngine
from pneumoscan.modeling import artifact, heads, models
from pneumoscan.safety import chest, decision

NOT_CHEST_SENTENCE = "probably not a frontal chest X-ray"
OUTSIDE_SENTENCE = "a frontal chest film unlike the training films (e.g. an adult's): the model is not validated for it"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _meta(with_chest: bool = True) -> artifact.ModelMeta:
    _, info = models.build("resnet18", weights="none")
    meta = artifact.make_meta(architecture="resnet18", head="seed", image_size=32, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    return meta.replace(ood={"cutoff_not_chest": 100.0, "cutoff_ood": 50.0, "percentile": 99.5,
                             "ood_percentile": 97.5},
                        chest={"cutoff": 0.0, "rule": "fixed for the test", "fitted_on": {}} if with_chest else None)


def test_two_questions_get_two_flags_with_their_own_sentences(monkeypatch):
    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    # (Mahalanobis distance, chest-film logit): an adult's frontal film is a chest film far from the
    # training films; a knee film is not a chest film (and far too); a child's film is neither
    scores, chest_logits = np.array([500.0, 500.0, 10.0, 70.0]), np.array([3.0, -3.0, 4.0, 2.0])
    v = decision.decide(_meta(), np.full(4, 2.0), scores, [[]] * 4, chest_logits=chest_logits)
    assert [x.flags for x in v] == [("outside_training_population",), ("not_chest_xray",), (), ("out_of_distribution",)]
    assert [x.label for x in v] == ["NOT_ASSESSED", "NOT_ASSESSED", "PNEUMONIA", "PNEUMONIA"]
    assert v[0].details[0].startswith(OUTSIDE_SENTENCE) and NOT_CHEST_SENTENCE not in v[0].details[0]
    assert v[1].details[0].startswith(NOT_CHEST_SENTENCE) and v[1].chest_logit == -3.0
    assert decision.SENTENCES["not_chest_xray"] == NOT_CHEST_SENTENCE
    assert decision.SENTENCES["outside_training_population"] == OUTSIDE_SENTENCE


def test_an_adult_frontal_film_never_gets_the_not_chest_sentence_at_any_distance(monkeypatch):
    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    scores = np.array([0.0, 60.0, 100.0, 1e4, 1e9])
    for policy in decision.POLICIES:
        v = decision.decide(_meta(), np.zeros(5), scores, [[]] * 5, chest_logits=np.full(5, 0.5), policy=policy)
        assert not any(NOT_CHEST_SENTENCE in d for x in v for d in x.details)
        assert all("not_chest_xray" not in x.flags for x in v)


def test_the_site_policy_downgrades_outside_population_to_a_warning(monkeypatch):
    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    args = (_meta(), np.array([-2.0, 2.0]), np.array([500.0, 500.0]), [[], []])
    warned = decision.decide(*args, chest_logits=np.array([1.0, -1.0]), policy="warn")
    assert warned[0].label == "NORMAL" and warned[0].flags == ("outside_training_population",)
    assert warned[0].details[0].startswith(OUTSIDE_SENTENCE) and decision.WARNED in warned[0].details[0]
    assert warned[1].label == "NOT_ASSESSED"  # not a chest film stays NOT_ASSESSED whatever the site says
    monkeypatch.setenv(decision.POLICY_ENV, "warn")
    assert decision.decide(*args, chest_logits=np.array([1.0, 1.0]))[0].label == "NORMAL"
    assert decision.not_competent() == ("not_chest_xray", "low_quality")
    monkeypatch.setenv(decision.POLICY_ENV, "sometimes")
    with pytest.raises(UserError, match="not_assessed, warn"):
        decision.decide(*args)


def test_without_a_chest_detector_a_far_film_is_not_called_a_non_chest_film(monkeypatch):
    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    (v,) = decision.decide(_meta(with_chest=False), np.zeros(1), np.array([500.0]), [[]])
    assert v.flags == ("outside_training_population",) and v.label == "NOT_ASSESSED"
    assert v.details[0].startswith(decision.SENTENCE_NO_DETECTOR) and NOT_CHEST_SENTENCE not in v.details[0]


def test_fit_folds_standardisation_and_the_cutoff_rule():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, (200, 8)), rng.normal(-1.0, 1.0, (200, 8))
    w, b = chest.fit(pos, neg, l2_normalize=False)
    state = chest.ChestState(weights=w, bias=b, cutoff=0.0, l2_normalize=False)
    assert (chest.logit(state, pos) > 0).mean() > 0.9 and (chest.logit(state, neg) < 0).mean() > 0.9
    cutoff, info = chest.choose_cutoff({"a": np.array([2.0] * 99 + [1.0]), "b": np.arange(3.0, 103.0)},
                                       np.arange(-100.0, 0.0))
    assert info["separated"] and cutoff == pytest.approx((info["positive_p1"]["a"] + info["negative_p99"]) / 2)
    assert chest.is_chest({"cutoff": 0.0}, 0.1) is True and chest.is_chest({"cutoff": 0.0}, -0.1) is False
    assert chest.is_chest(None, 1.0) is None and chest.is_chest({"cutoff": 0.0}, float("nan")) is None


@pytest.fixture(scope="module")
def chest_file(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ensemble import ensemble_file

    path = tmp_path_factory.mktemp("chest") / "model.pt"
    model, meta = ensemble_file(path, with_ood=True)
    g = torch.Generator().manual_seed(2)
    model.chest_head = heads.ChestHead(torch.randn(model.feature_dim, generator=g), torch.tensor([0.1]))
    artifact.save(path, model, meta.replace(chest={"cutoff": 0.0, "rule": "test", "fitted_on": {}}))
    return path


@pytest.mark.slow  # seconds of a real server or model; make test runs it
def test_the_detector_travels_in_model_pt_and_the_onnx_graph(chest_file, tmp_path):
    from test_ensemble import xrays

    images = xrays(6, seed=4)
    model, meta = artifact.load(chest_file)
    assert meta.chest["cutoff"] == 0.0 and model.chest_head is not None
    assert artifact.read(chest_file)["state_dict"]["chest_head.w"].dtype == torch.float32
    t_logit, t_ood, t_chest = TorchEngine(chest_file).score_all(images)
    out = onnx_export.export_onnx(chest_file, tmp_path / "m.onnx", check_images=images)
    o_logit, o_ood, o_chest = OnnxEngine(out).score_all(images, batch_size=4)
    np.testing.assert_allclose(o_chest, t_chest, atol=1e-4)
    np.testing.assert_allclose(o_logit, t_logit, atol=1e-4)
    assert np.isfinite(t_chest).all() and np.ptp(t_chest) > 0  # the head reads the images' own features
    with torch.inference_mode():  # the head is the folded numpy detector, one dot product
        f = model.embed(torch.from_numpy(images[:, None] / np.float32(255)))
    state = chest.ChestState(model.chest_head.w.numpy(), float(model.chest_head.b), 0.0)
    np.testing.assert_allclose(chest.logit(state, f.numpy()), t_chest, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # seconds of a real server or model; make test runs it
def test_predict_csv_api_and_card_carry_the_detector(chest_file, monkeypatch):
    from fastapi.testclient import TestClient

    from pneumoscan.serve.app import create_app
    from test_ensemble import xrays

    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    with TestClient(create_app(chest_file)) as client:
        card = client.get("/v1/model").json()
    checks = card["input_checks"]
    assert checks["chest_detector"]["cutoff_logit"] == 0.0 and checks["outside_population_policy"] == "not_assessed"
    assert checks["flags"]["not_chest_xray"].startswith(NOT_CHEST_SENTENCE)
    assert checks["flags"]["outside_training_population"].startswith(OUTSIDE_SENTENCE)
    engine = TorchEngine(chest_file)
    v = decision.assess(engine, xrays(4, seed=5), [(48, 48)] * 4)
    assert all((x.chest_logit is not None) for x in v)
    assert all(("not_chest_xray" in x.flags) == (x.chest_logit < 0.0) for x in v)


# --------------------------------------------------------------------------- the bundled model

def _bundled_has_detector() -> bool:
    return artifact.read_meta(artifact.BUNDLED_MODEL).chest is not None


def _report_files(folder: str, group: str, n: int) -> list[Path]:
    """The first ``n`` files of ``group`` in the report part (benchmarks/chest_data.py's rule): films
    neither the detector's fit nor its cut-off saw."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import chest_data

    files = [rel for rel, g, p in chest_data.folder_files(SHARED / folder, 3 if folder == "adult_cxr_normal" else 5)
             if p == "report" and g == group]
    return [SHARED / folder / rel for rel in files[:n]]


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")


@needs_shared
@pytest.mark.slow
def test_bundled_model_never_calls_held_out_adult_frontal_films_not_chest():
    from pneumoscan.commands import predict

    if not _bundled_has_detector():
        pytest.skip("the bundled model has no chest-film detector yet (tools/add_chest_detector.py)")
    files = _report_files("adult_cxr_normal", "rsna_via_covid19_radiography_db", 12)
    rows, skipped = predict.predict_files(None, files, engine="torch")
    assert not skipped and len(rows) == 12
    assert all("not_chest_xray" not in r.flags and not any(NOT_CHEST_SENTENCE in d for d in r.details) for r in rows)


@needs_shared
@pytest.mark.slow
def test_bundled_model_calls_held_out_lateral_and_limb_films_not_chest():
    from pneumoscan.commands import predict

    if not _bundled_has_detector():
        pytest.skip("the bundled model has no chest-film detector yet (tools/add_chest_detector.py)")
    files = [f for g in ("unifesp_lateral_chest", "unifesp_knee_leg_thigh", "unifesp_skull_sinus")
             for f in _report_files("other_radiographs", g, 3)]
    rows, _ = predict.predict_files(None, files, engine="torch")
    assert len(rows) == len(files) >= 6
    assert all(r.label == "NOT_ASSESSED" for r in rows)
    assert sum("not_chest_xray" in r.flags for r in rows) >= len(rows) - 1


def test_a_caller_without_chest_logits_gets_no_claim_that_the_image_is_a_chest_film(monkeypatch):
    """A face that forgot ``Engine.score_all`` must not call a knee film "a frontal chest film"."""
    monkeypatch.delenv(decision.POLICY_ENV, raising=False)
    (v,) = decision.decide(_meta(), np.zeros(1), np.array([500.0]), [[]])
    assert v.flags == ("outside_training_population",) and v.details[0].startswith(decision.SENTENCE_NO_DETECTOR)
