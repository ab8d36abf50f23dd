"""uint8 images to the float input every model reads, in one place."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def unit_interval(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], the input of every Classifier and ONNX export."""
    return np.ascontiguousarray(images, dtype=np.uint8)[:, None].astype(np.float32) / np.float32(255)


def spans(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_images(images: np.ndarray, size: int, who: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise ValueError(f"{who} expects uint8 images (N, {size}, {size}), got {images.dtype} {tuple(images.shape)}")
    return images
