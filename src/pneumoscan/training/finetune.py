"""LP-FT and WiSE-FT: fit the head alone before fine-tuning, and interpolate back towards that
probe afterwards. Both keep more of the pretrained features than fine-tuning from a random head."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from pneumoscan.training.litmodule import LitClassifier
from pneumoscan.training.loaders import Progress, feature_loaders

log = logging.getLogger(__name__)


def linear_probe(p, class_weights: tuple[float, float], progress: Progress | None) -> None:
    """LP-FT's first stage (Kumar et al., ICLR 2022): fit the head alone on cached features of the
    pretrained backbone, in place. Fine-tuning from a random head lets its large early gradients
    distort the pretrained features, which costs accuracy away from the training distribution.
    ``p`` is a ``train.Prepared`` (not annotated: train imports this module)."""
    tc = p.config.train
    train_loader, val_loader = feature_loaders(p.config, p.model, p.weights_info, p.split_data, p.augment, progress)
    lit = LitClassifier(p.model, class_weights, tc.lr, tc.backbone_lr, from_features=True,
                        label_smoothing=tc.label_smoothing, schedule="constant", weight_decay=tc.weight_decay,
                        mixup=tc.mixup)
    checkpoint = ModelCheckpoint(dirpath=p.run_dir / "linear-probe", filename="best",
                                 monitor="val_loss", mode="min", save_top_k=1)
    trainer = L.Trainer(max_epochs=tc.linear_probe_epochs, accelerator="auto", devices=1, logger=False,
                        callbacks=[EarlyStopping("val_loss", patience=max(tc.patience, 3), mode="min"), checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=p.run_dir)
    lit.train()
    trainer.fit(lit, train_loader, val_loader)
    lit.load_state_dict(torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
    log.info("linear probe: best of %d epochs (val_loss %.4f)", trainer.current_epoch, float(checkpoint.best_model_score))


def interpolate(model: torch.nn.Module, other: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT (Wortsman et al., CVPR 2022): ``model``'s weights become ``alpha * own + (1 - alpha)
    * other``, in place. Both ends share the pretrained start, so the line between them stays in
    one basin; counters (BatchNorm's num_batches_tracked) keep the fine-tuned value."""
    state = model.state_dict()
    for name, value in state.items():
        if value.is_floating_point() and name in other:
            value.mul_(alpha).add_(other[name].to(value.dtype), alpha=1 - alpha)
