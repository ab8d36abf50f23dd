"""``model.pt``: trained weights plus ``ModelMeta``, everything needed to use them.

The file is a plain dict of tensors and JSON-like values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs). ``ModelMeta`` says what the model
means (class names, image size, normalisation, temperature, decision threshold, training config,
versions); every loader builds the model from it instead of re-declaring it. The same record,
as a plain dict, sits in an exported ONNX file's metadata, so this module imports torch only
when it reads or writes weights: the ONNX scoring path needs the meta, not torch.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoscan import CLASS_NAMES, __version__
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path

if TYPE_CHECKING:
    from pneumoscan.modeling.models import Classifier, Ensemble

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-model/1"
INPUT = "grayscale in [0, 1], shape (N, 1, H, W); repeated to 3 channels inside the model"
OUTPUT = "calibrated logit of PNEUMONIA (temperature applied inside the model); probability = sigmoid"


@dataclass(frozen=True)
class Normalization:
    name: str  # imagenet | inception (backbones.NORMALIZATIONS)
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class TrainingInfo:
    """How the run went; facts for the model card, not needed to score."""

    epochs_run: int | None = None
    best_epoch: int | None = None
    seconds: float | None = None
    feature_seconds: float | None = None
    fast_path: bool | None = None
    seconds_per_epoch: float | None = None
    n_train: int | None = None
    n_val: int | None = None


@dataclass(frozen=True)
class Member:
    """One member of a multi-member model (``ModelMeta.members``): what ``load`` needs to rebuild
    it (architecture, head, normalisation, padding) and where it came from. Its ``temperature`` is
    its own, applied inside the ensemble to its logit before the mean (``models.Ensemble``); the
    ensemble's threshold and temperature are the ensemble's, fitted on validation for the mean."""

    architecture: str
    head: str
    normalization: Normalization
    tf_same_padding: bool = False
    temperature: float = 1.0
    backbone_weights: dict[str, Any] = field(default_factory=dict)
    # {"run": its run folder, "model_sha256": its model.pt, "threshold", "threshold_rule"}: provenance
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the RunConfig that trained it

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["normalization"] = _normalization_dict(self.normalization)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Member":
        missing = {"architecture", "head", "normalization"} - set(raw)
        if missing:
            raise UserError(f"model metadata: a member lacks {', '.join(sorted(missing))}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in raw.items() if k in names}
        known["normalization"] = _normalization(known["normalization"])
        known["tf_same_padding"] = bool(known.get("tf_same_padding", False))
        known["temperature"] = float(known.get("temperature", 1.0))
        return cls(**known)


def _normalization(raw: dict[str, Any]) -> Normalization:
    return Normalization(raw["name"], tuple(raw["mean"]), tuple(raw["std"]))


def _normalization_dict(norm: Normalization) -> dict[str, Any]:
    return {"name": norm.name, "mean": list(norm.mean), "std": list(norm.std)}


ENSEMBLE = "ensemble"  # ModelMeta.architecture of a multi-member model (models.ENSEMBLE)
PER_MEMBER = Normalization("per-member", (), ())  # an ensemble's normalisation: each member applies its own


@dataclass(frozen=True)
class ModelMeta:
    """What a model file means. ``to_dict``/``from_dict`` round-trip through the plain dict stored
    in ``model.pt`` and in ONNX metadata; keys this version does not know are kept in ``extra``."""

    architecture: str
    head: str
    image_size: int
    normalization: Normalization
    threshold: float
    threshold_rule: str
    temperature: float = 1.0
    tf_same_padding: bool = False
    backbone_weights: dict[str, Any] = field(default_factory=dict)  # {"source", "sha256"}
    class_names: tuple[str, ...] = CLASS_NAMES
    config: dict[str, Any] = field(default_factory=dict)  # the RunConfig that trained it
    training: TrainingInfo = field(default_factory=TrainingInfo)
    input: str = INPUT
    output: str = OUTPUT
    pneumoscan_version: str = __version__
    torch_version: str = ""
    format: str = FORMAT
    # out-of-distribution detector (ood.OODState without its arrays, which live in the weights as
    # the OOD head): cut-offs and how they were chosen; None for a model fitted without one
    ood: dict[str, Any] | None = None
    # "is this a frontal chest film?" detector (safety.chest): cut-off, rule and what it was fitted
    # on; its weights live in the weights as ``chest_head``. None for a model without one
    chest: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None  # gate.QualityLimits the model's inputs must meet
    # files.content_digest of every training and validation file, sorted: lets ``evaluate`` warn when
    # it is given images the model has seen. Empty for models older than this field (cannot check).
    data_digests: tuple[str, ...] = ()
    # a multi-member model (architecture ENSEMBLE): its members, in the order of the weights'
    # ``members.N.`` keys; empty for a single model, whose architecture, head and normalisation
    # are the top-level fields
    members: tuple[Member, ...] = ()
    # the UNSURE band (conformal.conformal_band): {"low", "high", "method", "confidence", "n_calibration",
    # "class_counts", ...}; a film with low <= P(PNEUMONIA) < high is UNSURE. None: no band, every
    # assessed film gets NORMAL or PNEUMONIA (models older than the field, or train.unsure=none)
    unsure: dict[str, Any] | None = None
    # prevalence: {"calibration": the PNEUMONIA share of the films the temperature was fitted on, ...};
    # after ``pneumoscan adapt`` also "site", "ci", "method", "n_images" and "logit_offset" (Δ, added
    # to every logit by ``site_logits``). None for models older than the field.
    prior: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def logit_offset(self) -> float:
        """Δ = logit(site prevalence) - logit(calibration prevalence); 0 unless ``adapt`` set it."""
        return float((self.prior or {}).get("logit_offset", 0.0))

    def site_logits(self, logits):
        """The logits every face turns into probabilities: the model's calibrated logit plus the
        prior-shift offset (``pneumoscan adapt``). The one place the offset is applied; the
        threshold and the UNSURE band in this meta are already on the shifted scale."""
        import numpy as np

        return np.asarray(logits, dtype=np.float64) + self.logit_offset

    def label(self, probability: float, threshold: float | None = None) -> str:
        """The class name a probability gets at ``threshold`` (default: the model's)."""
        return self.class_names[int(probability >= (self.threshold if threshold is None else threshold))]

    def replace(self, **changes) -> "ModelMeta":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["normalization"] = dataclasses.asdict(self.normalization)
        out["normalization"]["mean"], out["normalization"]["std"] = (list(self.normalization.mean),
                                                                     list(self.normalization.std))
        out["training"] = {k: v for k, v in dataclasses.asdict(self.training).items() if v is not None}
        out["class_names"] = list(self.class_names)
        out["data_digests"] = list(self.data_digests)
        if self.members:
            out["members"] = [m.to_dict() for m in self.members]
        else:  # a single model's dict stays exactly what it was before ensembles existed
            del out["members"]
        return out | self.extra

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelMeta":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = {"architecture", "head", "image_size", "normalization", "threshold", "threshold_rule"} - set(raw)
        if missing:
            raise UserError(f"model metadata lacks {', '.join(sorted(missing))}")
        known = {k: v for k, v in raw.items() if k in names}
        known["normalization"] = _normalization(known["normalization"])
        training_fields = {f.name for f in dataclasses.fields(TrainingInfo)}
        known["training"] = TrainingInfo(**{k: v for k, v in (known.get("training") or {}).items()
                                            if k in training_fields})
        known["class_names"] = tuple(known.get("class_names", CLASS_NAMES))
        known["data_digests"] = tuple(str(d) for d in known.get("data_digests") or ())
        known["members"] = tuple(Member.from_dict(m) for m in known.get("members") or ())
        if (known["architecture"] == ENSEMBLE) != bool(known["members"]):
            raise UserError(f"model metadata: architecture {known['architecture']!r} with "
                            f"{len(known['members'])} members")
        for key, kind in (("image_size", int), ("threshold", float), ("temperature", float)):
            if key in known:
                known[key] = kind(known[key])
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})


def make_meta(*, architecture: str, head: str, image_size: int, weights_info: dict, threshold: float,
              threshold_rule: str, config: dict, training: TrainingInfo | None = None) -> ModelMeta:
    import torch

    from pneumoscan.modeling import backbones

    mean, std = backbones.NORMALIZATIONS[weights_info["normalization"]]
    return ModelMeta(
        architecture=architecture, head=head, image_size=image_size,
        normalization=Normalization(weights_info["normalization"], tuple(mean), tuple(std)),
        tf_same_padding=bool(weights_info.get("tf_same_padding", False)),
        backbone_weights={"source": weights_info.get("source"), "sha256": weights_info.get("sha256")},
        threshold=float(threshold), threshold_rule=threshold_rule, config=config,
        training=training or TrainingInfo(), torch_version=str(torch.__version__),
    )


def save(path: str | Path, model: "Classifier | Ensemble", meta: ModelMeta, *, half: bool = False) -> Path:
    """``half`` stores float weights as fp16 (half the size, e.g. for the bundled model); loading
    always computes in fp32. The temperature stored is the model's own."""
    import torch

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:  # not the OOD head: its distances meet cut-offs fitted in fp32
        state = {k: v.half() if v.is_floating_point() and not k.startswith(("ood_head.", "chest_head.")) else v
                 for k, v in state.items()}
    meta = meta.replace(temperature=float(model.temperature))
    if meta.members:
        if len(meta.members) != len(model.members):
            raise ValueError(f"meta describes {len(meta.members)} members, the model has {len(model.members)}")
        meta = meta.replace(members=tuple(dataclasses.replace(m, temperature=float(net.temperature))
                                          for m, net in zip(meta.members, model.members)))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: torch.save would otherwise record the temp name,
            torch.save({"format": FORMAT, "meta": meta.to_dict(), "state_dict": state}, f)  # changing the sha256
    return Path(path)


def read(path: str | Path) -> dict:
    """The raw blob ({"format", "meta", "state_dict"}) of a model file, or UserError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a loadable pneumoscan model ({exc.__class__.__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a pneumoscan model file (expected format {FORMAT})")
    return blob


def add_data_digests(path: str | Path, digests, out: str | Path | None = None) -> Path:
    """Store ``digests`` (``files.content_digests`` of the training and validation files) in the
    model file at ``path`` (or a copy at ``out``), for models trained before they were recorded.

    The weights are kept exactly as stored (fp16 stays fp16); only the meta changes, so the file's
    sha256 changes too and anything recording it (a model card, an ONNX export's metadata) must be
    renewed.
    """
    import torch

    blob = read(path)
    meta = ModelMeta.from_dict(blob["meta"]).replace(data_digests=tuple(sorted(set(map(str, digests)))))
    target = Path(out) if out is not None else Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:  # a file object, as in save: the sha256 must not depend on the temp name
            torch.save({"format": FORMAT, "meta": meta.to_dict(), "state_dict": blob["state_dict"]}, f)
    log.info("%s: recorded %d training-data digests", target, len(meta.data_digests))
    return target


def read_meta(path: str | Path) -> ModelMeta:
    return ModelMeta.from_dict(read(path)["meta"])


def load(path: str | Path | None) -> tuple["Classifier | Ensemble", ModelMeta]:
    """The model in eval mode and its meta; ``None`` means the bundled model."""
    from pneumoscan.modeling import heads

    path = resolve(path)
    blob = read(path)
    meta = ModelMeta.from_dict(blob["meta"])
    model = build(meta)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    if meta.ood is not None:
        model.ood_head = heads.MahalanobisHead(state["ood_head.W"], state["ood_head.b"], state["ood_head.M"],
                                                l2_normalize=bool(meta.ood.get("l2_normalize", True)))
    if meta.chest is not None:
        model.chest_head = heads.ChestHead(state["chest_head.w"], state["chest_head.b"],
                                            l2_normalize=bool(meta.chest.get("l2_normalize", True)))
    model.load_state_dict(state)
    model.eval()
    log.debug("loaded %s (%s, threshold %.3f)", path, meta.architecture, meta.threshold)
    return model, meta


def build(meta: ModelMeta) -> "Classifier | Ensemble":
    """The untrained network ``meta`` describes (a Classifier, or an Ensemble of its members),
    ready for the file's state_dict."""
    from pneumoscan.modeling import models

    if not meta.members:
        model, _ = models.build(meta.architecture, weights="none", head=meta.head,
                                normalization=meta.normalization.name, tf_same_padding=meta.tf_same_padding)
        return model
    nets = [models.build(m.architecture, weights="none", head=m.head, normalization=m.normalization.name,
                         tf_same_padding=m.tf_same_padding)[0] for m in meta.members]
    return models.Ensemble(nets, [m.architecture for m in meta.members])


BUNDLED_MODEL = Path(__file__).parents[1] / "assets" / "model.pt"


def resolve(path: str | Path | None) -> Path:
    """The model a command should use: the one given, else the model shipped with the package."""
    if path:
        return Path(path)
    if BUNDLED_MODEL.is_file():
        return BUNDLED_MODEL
    raise UserError("no --model given and this installation has no bundled model")
