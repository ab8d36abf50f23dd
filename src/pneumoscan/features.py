"""Cached backbone features: the fast path for training with a frozen backbone.

With the backbone frozen (and in eval mode) its output for a given input never changes, so
running it every epoch is wasted work: 30 epochs of the seed study spend ~99% of their time there.
Instead each training image is embedded once per augmented view (``views`` of them, default 8),
validation and test images once without augmentation, and the head trains on these vectors —
an epoch then takes about a second. Each epoch draws one view per image at random, which stands
in for fresh augmentation. The cache lives on disk keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pneumoscan import data, models
from pneumoscan.files import atomic_path

log = logging.getLogger(__name__)


def cache_key(samples: Sequence[data.Sample], *, model_info: dict, image_size: int, augment: str,
              views: int, seed: int, precision: str) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\t{s.label}\n".encode())
    h.update(json.dumps({"model": model_info, "size": image_size, "augment": augment, "views": views,
                         "seed": seed, "precision": precision}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def embed(model: models.Classifier, images: np.ndarray, *, transform=None, batch_size: int = 64,
          bf16: bool = False, num_workers: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Pooled backbone features (N, D) float32; bf16 autocast + channels-last where the CPU has bf16."""
    model.eval()
    model.to(memory_format=torch.channels_last)  # outside inference mode: parameters stay ordinary tensors
    loader = DataLoader(data.ImageDataset(images, np.zeros(len(images)), transform),
                        batch_size=batch_size, num_workers=num_workers)
    out, done = [], 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, _ in loader:
            out.append(model.embed(x.contiguous(memory_format=torch.channels_last)).float())
            done += len(x)
            if progress:
                progress(done)
    model.to(memory_format=torch.contiguous_format)
    return torch.cat(out)


def cached_embed(model: models.Classifier, images: np.ndarray, samples: Sequence[data.Sample], *,
                 cache_dir: str | Path | None, key_info: dict, transform=None, views: int = 1, seed: int = 0,
                 bf16: bool = False, num_workers: int = 0,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, views, D) features, read from ``cache_dir`` when the same inputs were embedded before."""
    key = cache_key(samples, views=views, seed=seed, precision="bf16" if bf16 else "32", **key_info)
    path = Path(cache_dir) / f"features-{key}.pt" if cache_dir else None
    if path and path.is_file():
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if feats.shape[:2] == (len(samples), views):
            log.info("features from cache %s", path)
            return feats
    per_view = []
    for v in range(views):
        torch.manual_seed(seed * 1000 + v)  # reproducible augmented views
        per_view.append(embed(model, images, transform=transform, bf16=bf16, num_workers=num_workers,
                              progress=(lambda d, v=v: progress(v * len(images) + d)) if progress else None))
    feats = torch.stack(per_view, dim=1)
    if path:
        with atomic_path(path) as tmp:
            torch.save(feats, tmp)
    return feats


class FeatureDataset(Dataset):
    """One random view per image per access, i.e. a fresh draw each epoch."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]):
        self.features = features
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.features.shape[1], ())) if self.features.shape[1] > 1 else 0
        return self.features[i, v], self.labels[i]
