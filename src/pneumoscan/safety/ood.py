"""Out-of-distribution detector: is this image close to the radiographs the model was trained on?

The classifier is only competent on frontal paediatric chest films, yet it labels photos, CT
slices and knee X-rays "PNEUMONIA" with confidence: a softmax/sigmoid is not a distance. This
module measures the distance instead, on the 1280-d pooled backbone features, with the
class-conditional Mahalanobis score of Lee et al. (2018) ("A simple unified framework for
detecting out-of-distribution samples and adversarial attacks"):

    z       = (normalise(f) - center) @ components          # PCA to k dims, fitted on training films
    score   = min_c (z - mu_c)^T  P  (z - mu_c)              # P = shared (tied) precision matrix

It is closed-form (means, one covariance, one inverse), fits in a second, is a few matmuls to
score, and its whole state is plain arrays: it is stored in ``model.pt`` (``to_dict``), in JSON
(``to_json``), computed in numpy here (``score``, no torch import), and exported as the folded
form ``z' = f @ W - b``, ``score = min_c ||z' - m'_c||^2`` (``arrays``) for an ONNX subgraph, or as
an ``nn.Module`` (``torch_module``, imports torch lazily). We implement it directly instead of
depending on ``pytorch-ood``: its detectors are torch modules whose state is not plain data and
cannot be scored without torch, and the method is ten lines.

Size: with all 1280 dims no PCA rotation is stored; the state is one 1280x1280 precision matrix
plus a few vectors (6.6 MB float32, 3.3 MB fp16 in ``model.pt``; 31 MB as JSON lists, so keep
the matrices as tensors / ONNX initialisers and only the scalars in JSON metadata). k=512 would
store 1280x512 (2.6 MB) at 94.2% / 4.2% instead of 91.4% / 1.7% (wrong studies / shifted films).
Scoring 256 feature rows takes ~20 ms in numpy; the ONNX export of ``torch_module`` agrees with
``score`` to 1.4e-6 relative.

Decision (``flags``), with two cut-offs taken from held-out *validation* films' scores:

* ``not_chest_xray`` when the score is above ``cutoff_not_chest`` (default: the 99.5th percentile
  of validation scores, times ``margin``): far from every training radiograph, the model is not
  competent, the label becomes NOT_ASSESSED. Optionally also when a small "frontal chest
  radiograph or not" logistic classifier (fitted on the same features against negatives we make
  ourselves) is confident the image is not one.
* ``out_of_distribution`` when the score is above ``cutoff_ood`` (default: the 97.5th percentile)
  but not the first cut-off: unusual for a training film -- a different machine, exposure or
  patient -- but still a radiograph; the label is kept and marked, so a reader knows to look.

Chosen configuration, from ``benchmarks/ood.md`` (our own proxy sets, not the held-back ones):
the trained model's ``embed`` features (free at inference; the frozen ImageNet backbone was no
better and would cost a second backbone pass), all 1280 dimensions (PCA to 32 dims lost the
wrong-study directions: 78% vs 92% detected), L2-normalised, covariance fitted on training films
plus shifted copies, cut-offs at the 99.5th (not_chest_xray) and 97.5th (out_of_distribution)
percentiles of validation films. With the gate: 0.6% of validation films NOT_ASSESSED, 2.1% of
shifted films, 100% of non-radiograph test images, 91.4% of other-study proxies. kNN (Sun et al.
2022) and a logistic "frontal chest film or not" classifier were measured and not better (the
classifier, trained on synthetic images and photos, detected 71% of other studies and flagged
20% of shifted films), so the classifier is optional (``negatives=``) and off by default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VAL_QUANTILES = 41  # validation-score quantiles kept in the state for the drift monitor (``extra``)

VERSION = 1
# Below this many validation films a 99.5th-percentile cut-off is the largest of a handful of
# scores, and new films of the same kind exceed it often: no detector is fitted then.
MIN_VALIDATION = 100
NOT_CHEST = "not_chest_xray"
OOD = "out_of_distribution"


@dataclass
class OODState:
    """Everything needed to score; arrays are float32 numpy (``to_dict`` makes lists)."""

    feature_source: str  # which features it was fitted on, e.g. "model.embed" or "imagenet:mobilenet_v2"
    l2_normalize: bool
    center: np.ndarray  # (d,)
    components: np.ndarray | None  # (d, k) PCA directions; None: all d dims, no rotation stored
    class_means: np.ndarray  # (C, k) in PCA space
    precision: np.ndarray  # (k, k) shared precision matrix
    cutoff_not_chest: float
    cutoff_ood: float
    percentile: float  # of validation scores behind cutoff_not_chest (before margin)
    ood_percentile: float
    margin: float
    n_fit: int
    n_val: int
    version: int = VERSION
    # optional frontal-CXR classifier on the same (normalised) features: logit = f @ w + b
    clf_weights: np.ndarray | None = None  # (d,)
    clf_bias: float = 0.0
    clf_cutoff: float | None = None  # logit below this -> not_chest_xray
    clf_percentile: float | None = None  # of validation films' logits behind clf_cutoff
    extra: dict[str, Any] = field(default_factory=dict)

    _ARRAYS = ("center", "components", "class_means", "precision", "clf_weights")

    def to_dict(self) -> dict[str, Any]:
        """JSON-like dict (arrays as nested lists), e.g. for ``model.pt`` meta or ONNX metadata."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = v.astype(np.float32).tolist() if isinstance(v, np.ndarray) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OODState":
        """Accepts lists, numpy arrays or torch tensors (anything ``np.asarray`` takes)."""
        if int(d.get("version", 0)) != VERSION:
            raise ValueError(f"OOD state version {d.get('version')} is not {VERSION}")
        kw = dict(d)
        for k in cls._ARRAYS:
            if kw.get(k) is not None:
                kw[k] = np.asarray(kw[k], dtype=np.float32)
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "OODState":
        return cls.from_dict(json.loads(s))


def _prepare(features: np.ndarray, l2_normalize: bool) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if l2_normalize:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, *, k: int | None = None,
                    l2_normalize: bool = True, shrinkage: float = 1e-3) -> dict[str, np.ndarray]:
    """Center, PCA components, class means and tied precision (Lee et al. 2018, eq. 1).

    ``k`` None keeps all dimensions. ``shrinkage`` adds that fraction of the mean variance to the
    diagonal: with 1280 dims and a few thousand films the raw covariance is near singular.
    """
    x = _prepare(features, l2_normalize)
    labels = np.asarray(labels)
    center = x.mean(0)
    xc = x - center
    if k is None:
        k = xc.shape[1]
    k = min(k, xc.shape[1])
    if k >= xc.shape[1]:  # all dims: Mahalanobis is rotation-invariant, so skip PCA and its (d, d) matrix
        comps, z, k = None, xc, xc.shape[1]
    else:
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        comps = vt[:k].T  # (d, k); fewer films than k give fewer directions
        z, k = xc @ comps, comps.shape[1]
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    resid = z - means[np.searchsorted(classes, labels)]
    cov = resid.T @ resid / len(z)
    cov += shrinkage * np.trace(cov) / k * np.eye(k)
    prec = np.linalg.inv(cov)
    prec = (prec + prec.T) / 2
    return {"center": center, "components": comps, "class_means": means, "precision": prec}


def _maha(params: dict[str, np.ndarray], features: np.ndarray, l2_normalize: bool) -> np.ndarray:
    z = _prepare(features, l2_normalize) - params["center"]
    if params.get("components") is not None:
        z = z @ params["components"]
    out = np.full(len(z), np.inf)
    for mu in params["class_means"]:  # one BLAS matmul per class, not an (N, C, k, k) einsum
        d = z - mu
        out = np.minimum(out, ((d @ params["precision"]) * d).sum(1))
    return out


def fit_classifier(pos: np.ndarray, neg: np.ndarray, *, l2_normalize: bool = True,
                   c: float = 0.1) -> tuple[np.ndarray, float]:
    """Logistic regression "frontal chest film vs not" folded into one (w, b) on raw features.

    Standardisation is folded into the weights so scoring is one dot product. sklearn is
    imported here only (fit time); scoring never needs it.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([_prepare(pos, l2_normalize), _prepare(neg, l2_normalize)])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((x - mu) / sd, y)
    w = lr.coef_[0] / sd
    b = float(lr.intercept_[0] - (mu * w).sum())
    return w, b


def fit(features_train: np.ndarray, labels: np.ndarray, features_val: np.ndarray, *,
        percentile: float = 99.5, ood_percentile: float = 97.5, margin: float = 1.0,
        k: int | None = None, l2_normalize: bool = True, shrinkage: float = 1e-3,
        feature_source: str = "model.embed", negatives: np.ndarray | None = None,
        clf_percentile: float = 0.5) -> OODState:
    """Fit on training films' features, set cut-offs on validation films' scores.

    Pass the training films *and* shifted copies of them (gamma, contrast, blur, noise, JPEG,
    zoom-out, small rotations, burned-in text; labels of their originals) as ``features_train``:
    the tied covariance then spans acquisition shift, which cut false flags on shifted held-out
    films from 18.5% to 1.7% at the same cut-off while detection of wrong studies stayed at ~91%
    (benchmarks/ood.md).

    Validation films must be other patients than the training films, otherwise the cut-offs are
    too tight and real films get flagged. ``negatives`` (features of non-chest images) adds the
    optional frontal-CXR classifier; its cut-off is the ``clf_percentile`` percentile of the
    validation films' logits, so it flags about that share of real films.
    """
    if not 50 <= ood_percentile <= percentile <= 100:
        raise ValueError("need 50 <= ood_percentile <= percentile <= 100")
    params = fit_mahalanobis(features_train, labels, k=k, l2_normalize=l2_normalize, shrinkage=shrinkage)
    val = _maha(params, features_val, l2_normalize)
    state = OODState(
        feature_source=feature_source, l2_normalize=l2_normalize,
        **{n: None if params[n] is None else params[n].astype(np.float32)
           for n in ("center", "components", "class_means", "precision")},
        cutoff_not_chest=float(margin * np.percentile(val, percentile)),
        cutoff_ood=float(np.percentile(val, ood_percentile)),
        percentile=float(percentile), ood_percentile=float(ood_percentile), margin=float(margin),
        n_fit=int(len(features_train)), n_val=int(len(features_val)),
    )
    # the drift monitor's reference: the validation films' score distribution, compactly
    state.extra["val_score_quantiles"] = [float(v) for v in np.quantile(val, np.linspace(0, 1, VAL_QUANTILES))]
    if negatives is not None and len(negatives):
        w, b = fit_classifier(features_train, negatives, l2_normalize=l2_normalize)
        state.clf_weights, state.clf_bias = w.astype(np.float32), b
        state.clf_cutoff = float(np.percentile(classifier_logit(state, features_val), clf_percentile))
        state.clf_percentile = float(clf_percentile)
    log.info("OOD fitted on %d films (k=%s): cut-offs %.1f (not chest, p%.1f x %.2f), %.1f (ood, p%.1f)",
             state.n_fit, k, state.cutoff_not_chest, percentile, margin, state.cutoff_ood, ood_percentile)
    return state


def _params(state: OODState) -> dict[str, np.ndarray]:
    return {n: None if getattr(state, n) is None else getattr(state, n).astype(np.float64)
            for n in ("center", "components", "class_means", "precision")}


def score(state: OODState, features: np.ndarray) -> np.ndarray:
    """Mahalanobis score per row (higher = further from the training films); numpy only."""
    return _maha(_params(state), features, state.l2_normalize)


def classifier_logit(state: OODState, features: np.ndarray) -> np.ndarray:
    """Frontal-CXR logit per row (higher = more like a chest film); requires the classifier."""
    if state.clf_weights is None:
        raise ValueError("this OOD state has no frontal-CXR classifier")
    return _prepare(features, state.l2_normalize) @ state.clf_weights.astype(np.float64) + state.clf_bias


def flags(state: OODState, scores: np.ndarray, logits: np.ndarray | None = None) -> list[str | None]:
    """One code per image: ``not_chest_xray``, ``out_of_distribution`` or None (in distribution)."""
    scores = np.asarray(scores, dtype=np.float64)
    far = scores > state.cutoff_not_chest
    if logits is not None and state.clf_cutoff is not None:
        far |= np.asarray(logits) < state.clf_cutoff
    return [NOT_CHEST if f else OOD if s > state.cutoff_ood else None for f, s in zip(far, scores)]


def assess(state: OODState, features: np.ndarray) -> list[str | None]:
    """``flags`` from features: score (and classifier, when the state has one) in one call."""
    logits = classifier_logit(state, features) if state.clf_weights is not None else None
    return flags(state, score(state, features), logits)


def arrays(state: OODState) -> dict[str, np.ndarray]:
    """The folded float32 form for an ONNX subgraph (MatMul, Sub, Mul, ReduceSum, ReduceMin):

        f_n   = f / ||f||            (if l2_normalize)
        z     = f_n @ W - b          W = components @ L,  b = center @ W,  P = L L^T
        score = min_c sum((z - M[c])^2)      M = class_means @ L

    plus ``clf_w``/``clf_b`` when the state has a classifier (logit = f_n @ clf_w + clf_b).
    """
    p = _params(state)
    L = np.linalg.cholesky(p["precision"])
    W = L if p["components"] is None else p["components"] @ L
    out = {"W": W, "b": p["center"] @ W, "M": p["class_means"] @ L}
    if state.clf_weights is not None:
        out |= {"clf_w": state.clf_weights.astype(np.float64), "clf_b": np.array([state.clf_bias])}
    return {k: v.astype(np.float32) for k, v in out.items()}


def score_folded(a: dict[str, np.ndarray], features: np.ndarray, l2_normalize: bool) -> np.ndarray:
    """``score`` from ``arrays(state)``: what the ONNX subgraph computes, as a reference."""
    f = _prepare(features, l2_normalize).astype(np.float32)
    z = f @ a["W"] - a["b"]
    return ((z[:, None, :] - a["M"][None]) ** 2).sum(-1).min(1)


def torch_module(state: OODState):
    """The model's OOD head (``heads.MahalanobisHead``) for this state: (N, D) features -> (N,)
    scores, the form ``model.pt`` stores and the ONNX export computes. Imports torch lazily."""
    from pneumoscan.modeling.heads import MahalanobisHead

    a = arrays(state)
    return MahalanobisHead(a["W"], a["b"], a["M"], l2_normalize=bool(state.l2_normalize))


def describe(state: OODState) -> dict[str, Any]:
    """The state without its arrays: cut-offs and how they were chosen, for ``ModelMeta.ood``
    (the arrays travel in the weights, folded into the model's OOD head)."""
    return {k: v for k, v in state.to_dict().items() if k not in OODState._ARRAYS}
