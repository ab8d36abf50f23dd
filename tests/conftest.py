"""Shared fixtures: tiny synthetic chest-X-ray-like datasets, made fresh in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # tiny models; two threads on two shared cores only oversubscribe


def synthetic_xray(rng: np.random.Generator, label: int, size: int = 48) -> np.ndarray:
    """Dark lungs on a brighter body; PNEUMONIA adds a bright opacity, so tiny models can learn it."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 140 + 40 * np.sin(3 * xx) + rng.normal(0, 12, (size, size))
    for cx in (0.3, 0.7):
        img -= 80 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    if label:
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.7)
        img += 110 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - cy) / 0.12) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, counts: dict[str, tuple[int, int]], size: int = 48, seed: int = 0,
                 images_per_patient: int = 2) -> Path:
    """counts: split -> (n_normal, n_pneumonia). Kaggle-style names so patients can be grouped."""
    rng = np.random.default_rng(seed)
    patient = 0
    for split, (n_normal, n_pneu) in counts.items():
        for label, n in ((0, n_normal), (1, n_pneu)):
            folder = root / split / ("NORMAL" if label == 0 else "PNEUMONIA")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if i % images_per_patient == 0:
                    patient += 1
                name = (f"IM-{patient:04d}-{i:04d}.jpeg" if label == 0
                        else f"person{patient}_{'bacteria' if i % 3 else 'virus'}_{i}.jpeg")
                Image.fromarray(synthetic_xray(rng, label, size)).save(folder / name, quality=95)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """train 20/20 (val carved from it), test 6/6 — enough for one-epoch end-to-end tests."""
    return make_dataset(tmp_path / "chest_xray", {"train": (20, 20), "test": (6, 6)})


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """One tiny trained model shared by tests that only need *a* model.pt."""
    from pneumoscan.training import train
    from pneumoscan.core.config import RunConfig

    root = make_dataset(tmp_path_factory.mktemp("data") / "chest_xray", {"train": (20, 20), "test": (6, 6)})
    config = RunConfig()
    config.data.root = str(root)
    config.data.image_size = 48
    config.data.val_fraction = 0.25
    config.data.batch_size = 8
    config.model.backbone_weights = "none"
    config.train.epochs = 2
    config.train.precision = "32"
    # ~10 validation films cannot carry a 95% UNSURE band (it needs >= 19 of each class, else every film
    # is UNSURE): this shared model has none, and the UNSURE tests build the models they need
    config.train.unsure = "none"
    config.out_dir = str(tmp_path_factory.mktemp("runs"))
    config.name = "tiny"
    return train.fit(config) / "model.pt"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's ~/.cache (ONNX exports of test models land here instead)."""
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server for the session (skips with the apt line when not installed)."""
    from servers import postgres_server as start

    with start() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server, as a postgresql:// URL."""
    return postgres_server.create_database()
