"""Is this a frontal chest X-ray? A detector that answers that question, and only that one.

The Mahalanobis score (``ood``) measures how far an image is from *the training films*: Guangzhou
children aged 1-5. An adult's frontal chest film from another hospital is far from them too, so
that score alone called 65% of adult chest films "not a chest X-ray", which is false. The two
questions need two detectors:

* this one, "frontal chest film or not", trained on chest films of *both* populations (children
  of the training hospital and adults from elsewhere) against radiographs of other body parts,
  lateral chests, other modalities and non-radiographs (photos, documents, synthetic patterns);
* ``ood`` for "like the training films or not" (``outside_training_population``).

Model: L2-normalised pooled features (the model's own ``embed``, which for the bundled model are
frozen ImageNet features of MobileNetV2 and EfficientNet-Lite0, generic image features that know
nothing of pneumonia) -> standardise -> logistic regression (scikit-learn, class-balanced, L2).
Standardisation is folded into one weight vector and bias, so scoring is one dot product: in
numpy here (``logit``), in the model as ``heads.ChestHead`` and in the ONNX graph as the output
``chest_logit``. An image whose logit is below ``cutoff`` gets ``not_chest_xray``.

The cut-off is chosen on a *calibrate* part that the fit never saw (``choose_cutoff``): the
lowest 1st percentile of the chest-film groups' logits (children and adults separately, so the
smaller population is not outvoted), moved half-way in logit space towards the 99th percentile of
the negatives when the two are separated; the numbers of the chosen rule travel in
``ModelMeta.chest``. benchmarks/chest.py (``benchmarks/ood.md``) reports it on report parts that
neither the fit nor the cut-off saw.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VERSION = 1
CODE = "not_chest_xray"


@dataclass
class ChestState:
    """Everything needed to score: ``weights`` (D,) and ``bias`` on the (normalised) raw features."""

    weights: np.ndarray
    bias: float
    cutoff: float  # logit below this -> not_chest_xray
    l2_normalize: bool = True
    feature_source: str = "model.embed"
    rule: str = ""
    fitted_on: dict[str, int] = field(default_factory=dict)  # group -> films/images in the fit
    calibration: dict[str, Any] = field(default_factory=dict)  # the percentiles behind the cut-off
    version: int = VERSION

    def describe(self) -> dict[str, Any]:
        """The state without its weights, for ``ModelMeta.chest`` (the weights live in the model)."""
        out = {k: v for k, v in asdict(self).items() if k != "weights"}
        return out | {"bias": float(self.bias), "cutoff": float(self.cutoff)}


def _prepare(features: np.ndarray, l2_normalize: bool) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) if l2_normalize else f


def fit(positives: np.ndarray, negatives: np.ndarray, *, c: float = 0.05, l2_normalize: bool = True,
        pos_weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(weights, bias) of a class-balanced logistic regression, standardisation folded in.

    ``pos_weights`` lets each population of chest films count equally (children outnumber adults
    in the fit). scikit-learn is imported here only: scoring never needs it.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([_prepare(positives, l2_normalize), _prepare(negatives, l2_normalize)])
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    w_pos = np.ones(len(positives)) if pos_weights is None else np.asarray(pos_weights, dtype=np.float64)
    sample_weight = np.r_[w_pos / w_pos.sum(), np.full(len(negatives), 1.0 / len(negatives))] * len(y) / 2
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=5000).fit((x - mu) / sd, y, sample_weight=sample_weight)
    w = lr.coef_[0] / sd
    return w, float(lr.intercept_[0] - (mu * w).sum())


def logit(state: ChestState, features: np.ndarray) -> np.ndarray:
    """Chest-film logit per row (higher = more like a frontal chest film); numpy only."""
    return _prepare(features, state.l2_normalize) @ np.asarray(state.weights, np.float64) + float(state.bias)


def choose_cutoff(positive_groups: dict[str, np.ndarray], negatives: np.ndarray, *, pos_pct: float = 1.0,
                  neg_pct: float = 99.0) -> tuple[float, dict[str, Any]]:
    """The cut-off from calibrate-part logits, by the rule in the module docstring."""
    low = {g: float(np.percentile(v, pos_pct)) for g, v in positive_groups.items()}
    pos_edge = min(low.values())
    neg_edge = float(np.percentile(negatives, neg_pct))
    cutoff = (pos_edge + neg_edge) / 2 if neg_edge < pos_edge else pos_edge
    return cutoff, {"positive_p%g" % pos_pct: low, "negative_p%g" % neg_pct: neg_edge,
                    "separated": bool(neg_edge < pos_edge), "n": {g: int(len(v)) for g, v in positive_groups.items()}
                    | {"negatives": int(len(negatives))}}


def is_chest(meta_chest: dict[str, Any] | None, chest_logit: float) -> bool | None:
    """True / False by the model's cut-off; None when the model has no detector or no logit."""
    if not meta_chest or chest_logit is None or not np.isfinite(chest_logit):
        return None
    return bool(chest_logit >= float(meta_chest["cutoff"]))


def torch_module(state: ChestState):
    """``heads.ChestHead`` for this state (imports torch lazily)."""
    from pneumoscan.modeling.heads import ChestHead

    return ChestHead(np.asarray(state.weights, np.float32), np.array([state.bias], np.float32),
                     l2_normalize=state.l2_normalize)
