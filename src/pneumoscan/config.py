"""Typed configuration of a training run.

The defaults are the recipe that won patient-grouped 5-fold cross-validation on the training split
(benchmarks/accuracy.md): ImageNet MobileNetV2 fine-tuned end to end (head at 1e-3, backbone at
1e-4, cosine decay, at most 8 epochs, early stopping with patience 3), the seed study's head, the
"radiograph" augmentation and balanced class weights. ``RECIPES["seed-study"]`` is the study we
started from (frozen backbone, Keras augmentation, Adam 1e-3, patience 7). The resolved config is
written to every run folder, so a run can be repeated from that file alone.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pneumoscan.errors import UserError

SECTIONS = ("data", "model", "train")


@dataclass
class DataConfig:
    root: str = ""
    image_size: int = 224
    val_fraction: float = 0.1  # carved from train, grouped by patient, when val is too small
    min_val_images: int = 100
    augment: str = "radiograph"  # radiograph | seed | seed-noflip | none (see transforms.py)
    class_weights: str = "balanced"  # balanced | none
    strict: bool = False  # fail on unreadable files instead of skipping them
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"
    backbone_weights: str = "imagenet"  # imagenet | none | path to a state_dict
    weights_normalization: str = "auto"  # auto (known files) | imagenet | inception
    head: str = "seed"  # see models.HEADS
    unfreeze_blocks: int = -1  # last N backbone stages train; 0 = frozen backbone; -1 = all
    batchnorm: str = "train"  # train | frozen: trainable stages keep their ImageNet BN statistics


@dataclass
class TrainConfig:
    epochs: int = 8
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # used only for unfrozen backbone stages
    patience: int = 3
    schedule: str = "cosine"  # constant | cosine (learning rate over `epochs`)
    label_smoothing: float = 0.0  # BCE targets 0 -> e/2, 1 -> 1 - e/2
    unfreeze_at: str = ""  # progressive unfreezing, "EPOCH:STAGES,...", e.g. "2:3,4:-1"
    seed: int = 42
    precision: str = "auto"  # auto | 32 | bf16
    # on the temperature-calibrated probability; in CV, Youden's cut-off wandered from 0.30 to 0.91
    # between folds for the same mean accuracy (benchmarks/accuracy.md)
    threshold: str = "0.5"  # 0.5 | youden | sensitivity:0.95 | any float
    max_train_batches: float = 1.0  # fraction or count; for quick tests
    feature_cache: bool = True  # frozen backbone: train the head on cached features (fast path)
    views: int = 8  # augmented views per training image in the feature cache
    cache_dir: str = ""  # default: <out_dir>/.feature-cache
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"


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
        """Unknown keys are an error: a typo in a grid file must not be silently ignored."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            sub = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}.get(f.name)
            kwargs[f.name] = _build(sub, value) if sub else value
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**kwargs)


# Named starting points; `pneumoscan train --recipe NAME`, flags and --config override them.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # the seed study: frozen ImageNet MobileNetV2 + head exp9, Keras augmentation, Adam 1e-3,
    # early stopping with patience 7 (trained on cached features of 8 augmented views per image)
    "seed-study": {"data": {"augment": "seed"}, "model": {"unfreeze_blocks": 0},
                   "train": {"epochs": 30, "patience": 7, "schedule": "constant", "threshold": "youden"}},
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


def recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RunConfig.from_dict(merge(RunConfig().to_dict(), RECIPES[name]))


def _build(kind: type, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}; valid: {sorted(names)}")
    return kind(**values)
