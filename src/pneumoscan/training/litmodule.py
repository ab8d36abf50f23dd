"""The Lightning side of training: the module that computes the loss, and the callbacks and
precision choice the Trainer runs with. ``training.train`` builds the Trainer around them."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryPrecision, BinaryRecall

from pneumoscan.core.errors import UserError
from pneumoscan.modeling import models

log = logging.getLogger(__name__)


def epoch_metrics(prefix: str) -> MetricCollection:
    return MetricCollection({"accuracy": BinaryAccuracy(), "precision": BinaryPrecision(),
                             "recall": BinaryRecall(), "auc": BinaryAUROC()}, prefix=prefix)


class LitClassifier(L.LightningModule):
    """Weighted BCE on train (the study's class weights); plain BCE on validation, as Keras reports it.

    With images (not cached features), ``augment`` runs on each training batch once it is on the
    device, so a GPU does the augmentation instead of the data loader's CPU.
    """

    def __init__(self, model: models.Classifier, class_weights=(1.0, 1.0), lr: float = 1e-3,
                 backbone_lr: float = 1e-4, from_features: bool = False, augment: torch.nn.Module | None = None,
                 label_smoothing: float = 0.0, schedule: str = "constant", weight_decay: float = 0.0,
                 mixup: float = 0.0):
        super().__init__()
        self.model = model
        self.from_features = from_features  # batches hold cached backbone features, not images
        self.augment = augment
        self.register_buffer("class_weight", torch.tensor(class_weights, dtype=torch.float32))
        self.lr, self.backbone_lr = lr, backbone_lr
        self.label_smoothing, self.schedule = label_smoothing, schedule
        self.weight_decay, self.mixup = weight_decay, mixup
        self.train_metrics = epoch_metrics("train_")
        self.val_metrics = epoch_metrics("val_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if self.augment is not None and not self.from_features and self.trainer.training:
            x = self.augment(x)
        return x, y

    def _step(self, batch, stage: str, collection: MetricCollection) -> torch.Tensor:
        x, y = batch
        lam, other = self._mix(len(y), y.device) if stage == "train" else (1.0, None)
        if other is not None:
            x = lam * x + (1 - lam) * x[other]
        logits = (self.model.classify(x) if self.from_features else self.model(x)).float()
        if stage != "train":
            loss = F.binary_cross_entropy_with_logits(logits, y)
        elif other is None:
            loss = self._train_loss(logits, y)
        else:
            loss = lam * self._train_loss(logits, y) + (1 - lam) * self._train_loss(logits, y[other])
        collection.update(torch.sigmoid(logits), y.int())
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=True)
        self.log_dict(collection, on_step=False, on_epoch=True, prog_bar=False)
        return loss

    def _train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = y * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target, weight=self.class_weight[y.long()])

    def _mix(self, n: int, device: torch.device) -> tuple[float, torch.Tensor | None]:
        """mixup (Zhang et al. 2018): a Beta(a, a) weight and a partner for each film of the batch,
        from torch's generator (seeded per run). On cached features it mixes the pooled features
        (manifold mixup at the head's input), since the images behind them are not at hand."""
        if not self.mixup or n < 2:
            return 1.0, None
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        return lam, torch.randperm(n, device=device)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_metrics)

    def configure_optimizers(self):
        groups = models.parameter_groups(self.model, self.lr, self.backbone_lr)
        # decoupled weight decay (AdamW, Loshchilov & Hutter 2019); none keeps the study's plain Adam
        optimizer = (torch.optim.AdamW(groups, weight_decay=self.weight_decay) if self.weight_decay
                     else torch.optim.Adam(groups))
        if self.schedule == "constant":
            return optimizer
        if self.schedule != "cosine":
            raise UserError(f"unknown learning-rate schedule {self.schedule!r}; choose constant or cosine")
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.trainer.max_epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": cosine}


class ProgressiveUnfreezing(BaseFinetuning):
    """Unfreeze backbone stages top-down on a schedule ({epoch: trainable stages}), each newly
    trainable stage joining the optimizer at the backbone learning rate: the head settles first, so
    its early, large gradients do not wreck the pretrained features."""

    def __init__(self, schedule: dict[int, int], backbone_lr: float):
        super().__init__()
        self.schedule, self.backbone_lr = schedule, backbone_lr

    def freeze_before_training(self, pl_module: LitClassifier) -> None:
        pass  # models.build already froze all but the configured last stages

    def finetune_function(self, pl_module: LitClassifier, epoch: int, optimizer) -> None:
        if epoch not in self.schedule:
            return
        model = pl_module.model
        stages = list(model.features.children())
        keep_frozen = len(stages) - self.schedule[epoch]
        if keep_frozen < model.frozen_stages:
            self.unfreeze_and_add_param_group(stages[keep_frozen:model.frozen_stages], optimizer, lr=self.backbone_lr)
            model.frozen_stages = keep_frozen
            model.train()
            log.info("epoch %d: %d of %d backbone stages train", epoch + 1, len(stages) - keep_frozen, len(stages))


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        # bf16 autocast pays off only where the CPU has native bf16 (AVX512-BF16 / AMX)
        return "bf16-mixed" if torch.cpu._is_avx512_bf16_supported() else "32-true"
    return {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(precision, precision)
