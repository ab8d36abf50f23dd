"""What training reads: the run's samples and splits, and the loaders over decoded images or over
cached backbone features (the fast path of a frozen backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import DataLoader

from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError
from pneumoscan.io import data
from pneumoscan.modeling import models
from pneumoscan.training import features


def split_samples(config: RunConfig, manifest: Path | None) -> list[data.Sample]:
    """The run's samples with their splits: scanned and split fresh, or re-read from a run's manifest."""
    dc = config.data
    if manifest is not None:
        return data.read_manifest(manifest)
    samples = data.assign_validation(data.scan(dc.root), val_fraction=dc.val_fraction,
                                     min_val_images=dc.min_val_images, seed=config.train.seed)
    splits = {s.split for s in samples}
    if "train" not in splits:
        raise UserError(f"no training images found under {dc.root} (expected {dc.root}/train/NORMAL|PNEUMONIA)")
    if "val" not in splits:
        raise UserError(f"could not form a validation split from {dc.root}: too few patients")
    return samples


def by_split(samples: list[data.Sample], images: np.ndarray) -> dict[str, tuple[list[data.Sample], np.ndarray]]:
    out = {}
    for split in data.SPLITS:
        idx = np.array([i for i, s in enumerate(samples) if s.split == split], dtype=int)
        if len(idx):
            out[split] = ([samples[i] for i in idx], images[idx])
    return out


def make_loader(images: np.ndarray, labels, batch_size: int, num_workers: int, transform=None,
                shuffle: bool = False) -> DataLoader:
    ds = data.ImageDataset(images, labels, transform)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, drop_last=shuffle and len(ds) > batch_size)


Progress = Callable[[str, int, int], None]  # (stage, done, total), for a CLI progress bar


def feature_loaders(config: RunConfig, model: models.Classifier, weights_info: dict, split_data: dict,
                    augment, progress: Progress | None) -> tuple[DataLoader, DataLoader]:
    """The fast path's loaders: cached features of augmented train views and of plain val images."""
    tc, dc = config.train, config.data
    cache_dir = tc.cache_dir or str(Path(config.out_dir) / ".feature-cache")
    # ONNX Runtime in fp32 embeds faster on a CPU than PyTorch's bf16 autocast (about 2x for
    # EfficientNet-Lite0 and more for MobileNetV2 on an AVX512-BF16 EPYC), and exactly: "auto" takes it
    bf16 = tc.precision == "bf16"
    # the weights file's content, not its path, names the store: ../x.pth and /abs/x.pth share it
    key_info = {"model_info": {"architecture": config.model.backbone,
                               "weights": weights_info["sha256"] or weights_info["source"],
                               "normalization": weights_info["normalization"],
                               "tf_same_padding": weights_info["tf_same_padding"]},
                "image_size": dc.image_size}
    loaders = []
    for split, views, transform in (("train", tc.views if augment else 1, augment), ("val", 1, None)):
        samples, images = split_data[split]
        stage = f"embedding {split} ({views} view{'s' if views > 1 else ''})"
        feats = features.cached_embed(
            model, images, samples, cache_dir=cache_dir, key_info=key_info | {"augment": dc.augment if transform else "none"},
            transform=transform, views=views, seed=tc.seed, bf16=bf16,
            progress=(lambda k, s=stage, n=views * len(images): progress(s, k, n)) if progress else None)
        ds = features.FeatureDataset(feats, [s.label for s in samples])
        shuffle = split == "train"
        loaders.append(DataLoader(ds, batch_size=dc.batch_size * (1 if shuffle else 4), shuffle=shuffle,
                                  drop_last=shuffle and len(ds) > dc.batch_size))
    return loaders[0], loaders[1]
