"""Batched eager PyTorch over uint8 images: the reference the ONNX export is checked against,
and what training, calibration and Grad-CAM score with."""

from __future__ import annotations

import numpy as np
import torch

from pneumoscan.inference.batching import spans, unit_interval


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], the input every Classifier expects."""
    return torch.from_numpy(unit_interval(images))


def predict_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """fp32 logits; channels-last is ~2x faster on CPU convolutions and changes no numbers that matter.
    The model goes back to the CPU afterwards."""
    model.eval()
    model.to(device, memory_format=torch.channels_last)  # outside inference mode: parameters stay ordinary
    try:
        with torch.inference_mode():
            out = [model(as_batch(images[s]).to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
                   for s in spans(len(images), batch_size)]
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def assess(model: torch.nn.Module, images: np.ndarray,
           batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, OOD scores, chest-film logits) from one pass per batch (``Classifier.score_all``),
    on the CPU; NaN where the model lacks that head."""
    model.eval()
    columns: list[list[torch.Tensor]] = [[], [], []]
    with torch.inference_mode():
        for s in spans(len(images), batch_size):
            for column, value in zip(columns, model.score_all(as_batch(images[s]))):
                column.append(value.float())
    if not columns[0]:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    logits, scores, chest = (torch.cat(c).numpy() for c in columns)
    return logits, scores, chest
