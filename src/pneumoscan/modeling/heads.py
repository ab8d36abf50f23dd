"""What sits on a backbone's pooled features: the classifier heads of the seed study's
experiments (``HEADS``, ``build_head``) and the out-of-distribution head (``MahalanobisHead``)."""

from __future__ import annotations

import torch
from torch import nn

from pneumoscan.core import rules


HEADS = rules.HEADS  # the seed study's named heads; the spec language is core.rules.parse_head


def build_head(spec: str, in_features: int) -> nn.Sequential:
    """The layers of ``spec`` (a name in HEADS or a spec like "64,bn,d0.3,32"), then Dense(1)."""
    layers: list[nn.Module] = []
    width = in_features
    for layer in rules.parse_head(spec):
        if layer.kind == "bn":
            layers.append(nn.BatchNorm1d(width))
        elif layer.kind == "dropout":
            layers.append(nn.Dropout(layer.p))
        else:
            layers += [nn.Linear(width, layer.size), nn.ReLU()]
            width = layer.size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class MahalanobisHead(nn.Module):
    """Distance of pooled features from the training films: ``min_c ||n(f) @ W - b - M_c||^2``.

    The folded form of ``ood.OODState`` (``ood.arrays``): PCA, the tied precision and the class
    means are absorbed into W, b and M, so scoring is one matmul in PyTorch and in the ONNX graph.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, M: torch.Tensor, l2_normalize: bool = True):
        super().__init__()
        self.register_buffer("W", torch.as_tensor(W, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32))
        self.register_buffer("M", torch.as_tensor(M, dtype=torch.float32))
        self.l2_normalize = l2_normalize

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        if self.l2_normalize:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = f @ self.W - self.b
        return ((z.unsqueeze(1) - self.M.unsqueeze(0)) ** 2).sum(-1).amin(1)


class ChestHead(nn.Module):
    """"Is this a frontal chest film?": a logistic regression on the pooled features,
    ``logit = n(f) @ w + b`` (``safety.chest``; standardisation folded into ``w`` and ``b``). It reads
    the same features the classifier does, so it costs one dot product per image. It is only
    meaningful on generic features (a frozen ImageNet backbone), which the bundled model's are."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, l2_normalize: bool = True):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32).reshape(-1))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32).reshape(1))
        self.l2_normalize = l2_normalize

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        if self.l2_normalize:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return f @ self.w + self.b
