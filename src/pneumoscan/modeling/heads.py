"""What sits on a backbone's pooled features: the classifier heads of the seed study's
experiments (``HEADS``, ``build_head``) and the out-of-distribution head (``MahalanobisHead``)."""

from __future__ import annotations

import re

import torch
from torch import nn

from pneumoscan.core.errors import UserError


# Head specs: comma-separated layers after global average pooling; a number is Dense+ReLU,
# "bn" BatchNorm1d, "dN" dropout with p=N. The final Dense(1) is implicit. The names are the
# seed study's experiments (its table: exp 9 = "2x BN, no dropout" was best).
HEADS = {
    "seed": "64,bn,bn,32",  # experiment 9, the study's final model
    "exp1": "64,d0.5",
    "exp2": "64,64,d0.5",
    "exp3": "64,d0.3",
    "exp4": "64,d0.7",
    "exp5": "128,64,d0.5",
    "exp6": "64",
    "exp7": "64,bn",
    "exp8": "64,bn,32,bn",
    "exp9": "64,bn,bn,32",
    "exp10": "128,bn,64,bn,32",
    "linear": "",
}


def build_head(spec: str, in_features: int) -> nn.Sequential:
    spec = HEADS.get(spec, spec)
    layers: list[nn.Module] = []
    width = in_features
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if token == "bn":
            layers.append(nn.BatchNorm1d(width))
        elif re.fullmatch(r"d(0?\.\d+)", token):
            layers.append(nn.Dropout(float(token[1:])))
        elif token.isdigit():
            layers += [nn.Linear(width, int(token)), nn.ReLU()]
            width = int(token)
        else:
            raise UserError(
                f"bad head spec {spec!r} at {token!r}: use names {', '.join(HEADS)} or "
                "comma-separated layers like '64,bn,d0.3,32'"
            )
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
