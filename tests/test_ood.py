"""Mahalanobis OOD state: correct scores, exact cut-offs, storable as plain data."""

import json

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from pneumoscan.safety import ood


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    d = 16
    mix = rng.normal(size=(d, d))
    def draw(n, shift):
        return rng.normal(size=(n, d)) @ mix + shift
    a, b = np.zeros(d), np.r_[3.0, np.zeros(d - 1)]
    train = np.concatenate([draw(300, a), draw(300, b)])
    labels = np.r_[np.zeros(300), np.ones(300)].astype(int)
    val = np.concatenate([draw(100, a), draw(100, b)])
    far = draw(50, 25.0)
    return train, labels, val, far


def test_score_matches_scipy_mahalanobis(data):
    train, labels, val, _ = data
    st = ood.fit(train, labels, val, k=None, l2_normalize=False, shrinkage=0.0)
    # direct: class means and tied covariance on raw features, min over classes
    means = [train[labels == c].mean(0) for c in (0, 1)]
    resid = train - np.stack(means)[labels]
    vi = np.linalg.inv(resid.T @ resid / len(train))
    want = np.array([min(mahalanobis(x, m, vi) ** 2 for m in means) for x in val[:20]])
    np.testing.assert_allclose(ood.score(st, val[:20]), want, rtol=1e-3)


def test_cutoffs_are_the_stated_percentiles_of_validation_scores(data):
    train, labels, val, _ = data
    st = ood.fit(train, labels, val, percentile=99.0, ood_percentile=90.0, k=8)
    s = ood.score(st, val)
    assert st.cutoff_not_chest == pytest.approx(np.percentile(s, 99.0), rel=1e-4)
    assert st.cutoff_ood == pytest.approx(np.percentile(s, 90.0), rel=1e-4)
    assert (s > st.cutoff_not_chest).mean() == pytest.approx(0.01, abs=0.006)
    assert st.n_fit == 600 and st.n_val == 200 and st.percentile == 99.0


def test_far_points_are_not_chest_and_flags_are_three_way(data):
    train, labels, val, far = data
    st = ood.fit(train, labels, val, k=None, l2_normalize=False)
    assert set(ood.assess(st, far)) == {ood.NOT_CHEST}
    codes = ood.flags(st, np.array([0.0, (st.cutoff_ood + st.cutoff_not_chest) / 2, st.cutoff_not_chest * 2]))
    assert codes == [None, ood.OOD, ood.NOT_CHEST]
    assert (np.array(ood.assess(st, val)) == None).mean() > 0.95  # noqa: E711


def test_round_trips_through_dict_and_json(data):
    train, labels, val, far = data
    st = ood.fit(train, labels, val, k=8, negatives=far[:25], feature_source="test")
    d = json.loads(json.dumps(st.to_dict()))
    back = ood.OODState.from_dict(d)
    np.testing.assert_allclose(ood.score(back, val), ood.score(st, val), rtol=1e-5)
    assert ood.OODState.from_json(st.to_json()).cutoff_not_chest == st.cutoff_not_chest
    assert back.feature_source == "test" and back.clf_cutoff == st.clf_cutoff
    d["version"] = 99
    with pytest.raises(ValueError):
        ood.OODState.from_dict(d)


def test_classifier_cutoff_is_percentile_of_validation_logits(data):
    train, labels, val, far = data
    st = ood.fit(train, labels, val, k=8, negatives=far[:25], clf_percentile=2.0)
    lg = ood.classifier_logit(st, val)
    assert st.clf_cutoff == pytest.approx(np.percentile(lg, 2.0))
    assert (ood.classifier_logit(st, far[25:]) < st.clf_cutoff).all()


def test_folded_arrays_and_torch_module_give_the_same_scores(data):
    train, labels, val, far = data
    st = ood.fit(train, labels, val, k=8)
    x = np.concatenate([val[:10], far[:5]])
    want = ood.score(st, x)
    np.testing.assert_allclose(ood.score_folded(ood.arrays(st), x, st.l2_normalize), want, rtol=1e-3)
    torch = pytest.importorskip("torch")
    got = ood.torch_module(st)(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_scoring_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from pneumoscan.safety import ood, gate; "
            "s = ood.fit(np.random.rand(50, 4), np.r_[np.zeros(25), np.ones(25)], np.random.rand(20, 4), k=None); "
            "ood.score(s, np.random.rand(3, 4)); gate.check_quality(np.zeros((8, 8), np.uint8)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shifted_views_keep_shape_and_source_index_and_are_reproducible():
    from pneumoscan.modeling import shifts

    imgs = np.random.default_rng(0).integers(30, 220, (5, 64, 64)).astype(np.uint8)
    v, idx = shifts.shifted_views(imgs, 8, seed=1)
    assert v.shape == (8, 64, 64) and v.dtype == np.uint8 and idx.shape == (8,) and idx.max() < 5
    v2, idx2 = shifts.shifted_views(imgs, 8, seed=1)
    np.testing.assert_array_equal(v, v2)
    np.testing.assert_array_equal(idx, idx2)
    assert shifts.zoom_out(imgs[0], 0.5)[0, 0] == 0 and shifts.crop_zoom(imgs[0], 0.5).shape == (64, 64)
