"""Classifiers and ensembles: how a backbone and a head become a model, and how models combine.

A model is ``Classifier``: it takes grayscale images in [0, 1] shaped (N, 1, H, W), repeats them to
three channels, applies the normalisation its backbone weights were trained with, and returns one
*calibrated* logit per image (``logit / temperature``). Keeping normalisation and temperature inside
the module means every consumer (evaluate, predict, ONNX, the service) only applies a sigmoid and
never re-declares preprocessing.

``Ensemble`` has the same interface over several Classifiers (a deep ensemble): each member keeps
its own normalisation, and the output is still one calibrated logit per image. The backbone
registry and weight loading are in ``modeling.backbones``, the heads in ``modeling.heads``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pneumoscan.core import rules
from pneumoscan.core.errors import UserError
from pneumoscan.modeling.backbones import (NORMALIZATIONS, _load_pretrained, backbone, resolve_weights,
                                           use_tf_same_padding)
from pneumoscan.modeling.heads import build_head

log = logging.getLogger(__name__)


def _nan(f: torch.Tensor) -> torch.Tensor:
    return torch.full((len(f),), float("nan"))


class _Scorer(nn.Module):
    """What every model does with its ``embed`` and ``classify``: one calibrated logit per image,
    and beside it the out-of-distribution score and the chest-film logit of the same pooled features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def assess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit, out-of-distribution score) from one pass; NaN scores without an OOD head."""
        return self.score_all(x)[:2]

    def score_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logit, out-of-distribution score, chest-film logit) from one pass; NaN for a missing head."""
        f = self.embed(x)
        ood = self.ood_head(f) if self.ood_head is not None else _nan(f)
        chest = self.chest_head(f) if getattr(self, "chest_head", None) is not None else _nan(f)
        return self.classify(f), ood, chest


class Classifier(_Scorer):
    def __init__(self, features: nn.Sequential, head: nn.Sequential,
                 normalization: str = "imagenet", frozen_stages: int = 0, freeze_batchnorm: bool = False):
        super().__init__()
        mean, std = NORMALIZATIONS[normalization]
        self.features = features
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(1.0))
        self.frozen_stages = frozen_stages
        self.freeze_batchnorm = freeze_batchnorm  # trainable stages keep their pretrained BN statistics
        self.add_module("ood_head", None)  # a MahalanobisHead once an OOD detector is fitted
        self.add_module("chest_head", None)  # a ChestHead once a chest-film detector is fitted

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; the cacheable part when the backbone is frozen."""
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1) / self.temperature

    @property
    def feature_dim(self) -> int:
        """Width of ``embed``'s output: what the head (and an OOD head) read."""
        first = self.head[0]
        return int(getattr(first, "in_features", None) or first.num_features)

    def train(self, mode: bool = True) -> "Classifier":
        # Frozen stages stay in eval mode: their BatchNorm statistics are part of the pretrained weights.
        super().train(mode)
        for stage in list(self.features.children())[: self.frozen_stages]:
            stage.eval()
        if mode and self.freeze_batchnorm:
            for m in self.features.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


ENSEMBLE = "ensemble"  # ModelMeta.architecture of a multi-member model


class Ensemble(_Scorer):
    """A deep ensemble (Lakshminarayanan et al. 2017) with the interface of a ``Classifier``.

    ``members`` are Classifiers, each applying its own normalisation (and TF padding) in its own
    ``embed``, so members trained from different weights files mix freely. ``embed`` concatenates
    their pooled features (what the ensemble's OOD head reads, and what ``classify`` splits again);
    ``classify`` averages the members' *calibrated* logits (each head's logit over that member's
    own temperature) and divides by the ensemble's ``temperature``, fitted on validation for the
    ensemble as a whole.

    Why the members' temperatures are applied: a fine-tuned member is usually overconfident (raw
    logits several times those of a frozen-backbone one) and would otherwise outvote the others on
    every image; calibrated, each member's logit speaks in the same units (log-odds it can back up
    on validation). Averaging members that agree more than chance makes the mean under-confident,
    which the ensemble's own temperature then corrects.

    Why the mean logit and not the paper's mean probability: the output stays a logit, so every
    consumer (sigmoid, temperature, the ONNX output ``logit``, threshold rules) is unchanged; and
    logit(mean p) would have to be taken back through log(p / (1 - p)), which in float32 saturates
    to inf for confident members. The two are close while members roughly agree; when they
    disagree strongly the mean logit (a geometric mean of the odds) follows the more confident
    member further than the mean probability would (0.5 and 0.99 give 0.91, not 0.75), which
    the ensemble temperature, fitted on validation, tempers where that is over-confident.

    ``architectures`` names each member's backbone (``BACKBONES``), for Grad-CAM's target layers.

    Members whose ``embed`` is the same function (same backbone weights, normalisation and
    padding: two heads trained on one frozen backbone, as the default recipe's are) share one
    backbone pass: ``sources[i]`` is the member whose features member ``i`` reuses. The output is
    the same tensor the separate passes would give, at the cost of one backbone instead of two.
    """

    def __init__(self, members: list[Classifier], architectures: list[str] | tuple[str, ...]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        if len(architectures) != len(members):
            raise ValueError(f"{len(members)} members but {len(architectures)} architectures")
        self.members = nn.ModuleList(members)
        self.architectures = tuple(architectures)
        self.feature_dims = tuple(m.feature_dim for m in members)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.add_module("ood_head", None)  # a MahalanobisHead on the concatenated features
        self.add_module("chest_head", None)  # a ChestHead on the concatenated features
        self.share_identical_embeddings()
        self.register_load_state_dict_post_hook(_reshare_after_load)

    def share_identical_embeddings(self) -> tuple[int, ...]:
        """Recompute ``sources`` from the members' current weights (after loading a state_dict)."""
        sources: list[int] = []
        for i, member in enumerate(self.members):
            sources.append(next(j for j in range(i + 1) if j == i or (
                sources[j] == j and self.architectures[j] == self.architectures[i]
                and same_embedding(self.members[j], member))))
        self.sources = tuple(sources)
        return self.sources

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        computed: dict[int, torch.Tensor] = {}
        for source in self.sources:
            if source not in computed:
                computed[source] = self.members[source].embed(x)
        return torch.cat([computed[source] for source in self.sources], dim=1)

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, members): each member's calibrated logit from the concatenated features."""
        parts = torch.split(features, list(self.feature_dims), dim=1)
        return torch.stack([m.classify(f) for m, f in zip(self.members, parts)], dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.member_logits(features).mean(dim=1) / self.temperature


def _reshare_after_load(ensemble: Ensemble, incompatible_keys) -> None:
    ensemble.share_identical_embeddings()


def same_embedding(a: Classifier, b: Classifier) -> bool:
    """Whether ``a.embed`` and ``b.embed`` compute the same function: equal normalisation, equal
    backbone tensors and the same padding (TF-SAME hooks included) in every layer."""
    if not (torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)):
        return False
    mods_a, mods_b = list(a.features.modules()), list(b.features.modules())
    if len(mods_a) != len(mods_b) or any(
            type(x) is not type(y) or getattr(x, "padding", None) != getattr(y, "padding", None)
            or len(x._forward_pre_hooks) != len(y._forward_pre_hooks) for x, y in zip(mods_a, mods_b)):
        return False
    state_a, state_b = a.features.state_dict(), b.features.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k], state_b[k]) for k in state_a)


def cam_layer_paths(model: nn.Module, architecture: str) -> list[str]:
    """Module paths of the layers Grad-CAM explains: the backbone's ``cam_layer``, or for an
    Ensemble that of every backbone that runs (members sharing one are explained once; the CAM
    library averages the per-layer maps)."""
    if isinstance(model, Ensemble):
        return [f"members.{i}.{backbone(model.architectures[i]).cam_layer}" for i in sorted(set(model.sources))]
    return [backbone(architecture).cam_layer]


def build(name: str = "mobilenet_v2", *, weights: str = "none", head: str = "seed",
          unfreeze_blocks: int = 0, normalization: str = "auto",
          tf_same_padding: bool | None = None, batchnorm: str = "train") -> tuple[Classifier, dict]:
    """Build a Classifier; returns it with the weight facts to record in the artifact.

    ``unfreeze_blocks`` = how many of the last backbone stages train (-1 = all). Loading an artifact
    builds with ``weights="none"`` and the normalisation and padding the artifact recorded.
    ``batchnorm="frozen"`` keeps BatchNorm statistics of trainable stages fixed (small batches).
    """
    if batchnorm not in ("train", "frozen"):
        raise UserError(f"unknown batchnorm mode {batchnorm!r}; choose train or frozen")
    spec = backbone(name)
    info = resolve_weights(name, weights, normalization)
    if tf_same_padding is not None:
        info["tf_same_padding"] = tf_same_padding
    full = spec.build()
    _load_pretrained(name, full, info["source"])
    features = spec.trunk(full)
    if info["tf_same_padding"]:
        use_tf_same_padding(features)
    n_stages = len(list(features.children()))
    if unfreeze_blocks < 0 or unfreeze_blocks >= n_stages:
        unfreeze_blocks = n_stages
    frozen = n_stages - unfreeze_blocks
    for stage in list(features.children())[:frozen]:
        stage.requires_grad_(False)
    model = Classifier(features, build_head(head, spec.feature_dim), info["normalization"], frozen,
                       freeze_batchnorm=batchnorm == "frozen")
    info |= {"frozen_stages": frozen, "n_stages": n_stages}
    return model, info


def stages_to_unfreeze(schedule: str, n_stages: int) -> dict[int, int]:
    """A progressive-unfreezing schedule (``rules.parse_unfreeze``) as {epoch: trainable stages},
    -1 or more than there are meaning all ``n_stages``."""
    return {epoch: n_stages if stages < 0 or stages > n_stages else stages
            for epoch, stages in rules.parse_unfreeze(schedule).items()}


def parameter_groups(model: Classifier, lr: float, backbone_lr: float) -> list[dict]:
    """Head at ``lr``; unfrozen backbone stages at their own, lower ``backbone_lr``."""
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    trainable = [p for p in model.features.parameters() if p.requires_grad]
    if trainable:
        groups.append({"params": trainable, "lr": backbone_lr, "name": "backbone"})
    return groups
