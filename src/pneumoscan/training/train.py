"""Training a classifier: the Lightning loop, then calibration and the decision threshold.

``fit`` turns a ``RunConfig`` into a run folder that can be understood and repeated on its own:
config.yaml, manifest.csv (every file with its split), skipped.csv, history.csv, curves.png,
checkpoints/ (best and last, for --resume), model.pt, validation.json and, when the data has a
test split, test/ with its evaluation, then report.html (one self-contained page on the test
split, else validation, with Grad-CAM galleries of its most confident errors). Temperature and
threshold are fitted on the validation split only; the test split is only ever measured.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryPrecision, BinaryRecall

from pneumoscan.modeling import artifact, models, shifts, transforms
from pneumoscan.io import data
from pneumoscan.evaluation import evaluate, plots
from pneumoscan.training import features
from pneumoscan.safety import gate, ood
from pneumoscan.core import calibration, conformal, metrics
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path, content_digests, write_csv, write_text
from pneumoscan.inference.torch_model import predict_logits

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


def default_run_name(config: RunConfig) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{'ensemble' if config.train.members else config.model.backbone}"


def new_run_dir(config: RunConfig) -> Path:
    name = config.name or default_run_name(config)
    run_dir = Path(config.out_dir) / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.out_dir) / f"{name}-{suffix}"
    return run_dir


def tidy_history(run_dir: Path, out: Path) -> Path:
    """One row per epoch from Lightning's CSV logs (which put train and val on separate rows, and
    start a new folder each time a run is resumed)."""
    by_epoch: dict[int, dict[str, str]] = {}
    for log_file in sorted(run_dir.glob("logs*/metrics.csv"), key=lambda p: (len(p.parent.name), p.parent.name)):
        with open(log_file, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("epoch", "") == "":
                    continue
                epoch = int(float(row["epoch"]))
                by_epoch.setdefault(epoch, {}).update({k: v for k, v in row.items() if v != "" and k != "step"})
    columns = ["epoch"] + sorted({k for row in by_epoch.values() for k in row} - {"epoch"})
    rows = [[by_epoch[e].get(c, "") if c != "epoch" else e + 1 for c in columns] for e in sorted(by_epoch)]
    return write_csv(out, columns, rows)


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


def log_version(run_dir: Path) -> str:
    """``logs`` for a new run, ``logs-2``, ``logs-3``... for each resume, so no history is overwritten."""
    n = 1
    while (run_dir / ("logs" if n == 1 else f"logs-{n}")).exists():
        n += 1
    return "logs" if n == 1 else f"logs-{n}"


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


def fit(config: RunConfig, *, resume_dir: str | Path | None = None, callbacks: list | None = None,
        progress: Progress | None = None, loggers: list | None = None,
        samples: list[data.Sample] | None = None, images: np.ndarray | None = None,
        report: bool = True) -> Path:
    """Train, calibrate, choose the threshold, save model.pt; returns the run folder.

    ``loggers`` (e.g. an MLFlowLogger) receive the epoch metrics besides the run folder's CSV log.
    ``samples`` (with their splits) replaces scanning ``config.data.root``, for cross-validation;
    ``images`` are those samples already decoded (cross-validation decodes once for all folds);
    ``report=False`` skips the HTML report and its Grad-CAM galleries (cross-validation folds).
    """
    prepared = prepare(config, resume_dir=resume_dir, samples=samples, images=images, progress=progress)
    trained = train_model(prepared, callbacks=callbacks, loggers=loggers, progress=progress)
    if not trained.is_global_zero:
        return trained.run_dir  # under DDP, rank 0 calibrates, saves and evaluates
    return finalize(prepared, trained, report=report)


@dataclass
class Prepared:
    """A run whose input is known good: everything that can fail on user input has been checked,
    and nothing is written yet."""

    config: RunConfig
    run_dir: Path
    last_checkpoint: Path | None  # set when resuming
    model: models.Classifier
    weights_info: dict
    augment: torch.nn.Module | None
    unfreeze_schedule: dict[int, int]
    samples: list[data.Sample]  # decoded ones, with their splits
    skipped: list[tuple[str, str]]
    split_data: dict[str, tuple[list[data.Sample], np.ndarray]]

    @property
    def fast(self) -> bool:
        """Frozen backbone: train the head on cached features."""
        tc = self.config.train
        return self.config.model.unfreeze_blocks == 0 and tc.feature_cache and not self.unfreeze_schedule


@dataclass
class Trained:
    model: models.Classifier  # best weights (early stopping's "restore best"), on the CPU, eval mode
    device: torch.device  # where it trained; it also scores validation and test there
    history: Path
    epochs_run: int
    train_seconds: float
    feature_seconds: float
    is_global_zero: bool
    run_dir: Path  # rank 0's folder, which ModelCheckpoint broadcast to every rank


def prepare(config: RunConfig, *, resume_dir: str | Path | None = None, samples: list[data.Sample] | None = None,
            images: np.ndarray | None = None, progress: Progress | None = None) -> Prepared:
    """Resolve the config (a resumed run's own), build the model, scan, split and decode."""
    last = None
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise UserError(f"cannot resume: {cfg_file} not found")
        config = RunConfig.from_dict(yaml.safe_load(cfg_file.read_text()))
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise UserError(f"cannot resume: no checkpoint at {last}")
    config.validate()  # a config built or changed in code is checked like one from the CLI
    tc, dc, mc = config.train, config.data, config.model
    L.seed_everything(tc.seed, workers=True, verbose=False)
    model, weights_info = models.build(mc.backbone, weights=mc.backbone_weights, head=mc.head,
                                       unfreeze_blocks=mc.unfreeze_blocks, normalization=mc.weights_normalization,
                                       batchnorm=mc.batchnorm)
    unfreeze_schedule = models.stages_to_unfreeze(tc.unfreeze_at, weights_info["n_stages"])
    augment = transforms.train_transform(dc.augment, dc.image_size)
    if samples is None:
        samples = split_samples(config, run_dir / "manifest.csv" if last else None)
    if images is None:
        samples, images, skipped = data.load_images(
            samples, dc.image_size, strict=dc.strict,
            progress=(lambda k: progress("decoding images", k, len(samples))) if progress else None)
    else:
        skipped = []
    split_data = by_split(samples, images)
    data.class_weights([s.label for s in split_data["train"][0]], dc.class_weights)  # both classes present
    return Prepared(config=config, run_dir=run_dir if last else new_run_dir(config), last_checkpoint=last,
                    model=model, weights_info=weights_info, augment=augment, unfreeze_schedule=unfreeze_schedule,
                    samples=list(samples), skipped=skipped, split_data=split_data)


def train_model(p: Prepared, *, callbacks: list | None = None, loggers: list | None = None,
                progress: Progress | None = None) -> Trained:
    """The Lightning loop with early stopping; writes the run folder's config, manifest and logs."""
    tc, dc = p.config.train, p.config.data
    checkpoint = ModelCheckpoint(dirpath=p.run_dir / "checkpoints", filename="best", monitor="val_loss",
                                 mode="min", save_top_k=1, save_last=True)
    trainer = make_trainer(p, checkpoint, callbacks or [], loggers or [])
    # Under DDP (torchrun, SLURM, or Lightning re-running the script) every process runs this
    # function, each with its own guess at a fresh folder name; the Trainer already knows its rank,
    # and only global rank 0 creates and writes the run folder.
    if trainer.is_global_zero:
        if p.last_checkpoint is None:
            write_run_folder(p)
        log.info("run folder: %s", p.run_dir)
    (train_samples, train_images), (val_samples, val_images) = p.split_data["train"], p.split_data["val"]
    y_train, y_val = [s.label for s in train_samples], [s.label for s in val_samples]
    weights = data.class_weights(y_train, dc.class_weights)
    log.info("train %d images, val %d; class weights NORMAL %.4f, PNEUMONIA %.4f",
             len(train_samples), len(val_samples), *weights)

    started = time.perf_counter()
    probe = p.run_dir / "linear-probe" / "weights.pt"
    probed = bool(tc.linear_probe_epochs) and not p.fast
    if probed and p.last_checkpoint is None:  # a resumed run finished its probe before its first checkpoint
        linear_probe(p, weights, progress)
        if trainer.is_global_zero:
            with atomic_path(probe) as tmp:
                torch.save(p.model.state_dict(), tmp)
    if p.fast:
        train_loader, val_loader = feature_loaders(p.config, p.model, p.weights_info, p.split_data, p.augment, progress)
    else:  # augmentation runs on the device, in LitClassifier.on_after_batch_transfer
        train_loader = make_loader(train_images, y_train, dc.batch_size, dc.num_workers, shuffle=True)
        val_loader = make_loader(val_images, y_val, dc.batch_size * 2, 0)
    # after a linear probe the head already fits: it fine-tunes as gently as the backbone
    lit = LitClassifier(p.model, weights, tc.backbone_lr if probed else tc.lr, tc.backbone_lr, from_features=p.fast,
                        augment=None if p.fast else p.augment, label_smoothing=tc.label_smoothing,
                        schedule=tc.schedule, weight_decay=tc.weight_decay, mixup=tc.mixup)
    feature_seconds = time.perf_counter() - started
    started = time.perf_counter()
    # Lightning (>= 2.2) trains modules in whatever mode they are in: set it here, so the head's
    # BatchNorm learns while frozen stages (and, with batchnorm=frozen, all backbone BN) stay in eval
    lit.train()
    # Lightning shards both loaders with a DistributedSampler under DDP (reshuffled each epoch)
    trainer.fit(lit, train_loader, val_loader, ckpt_path=p.last_checkpoint)
    train_seconds = time.perf_counter() - started
    history = p.run_dir / "history.csv"
    if trainer.is_global_zero:
        best = checkpoint.best_model_path or str(p.run_dir / "checkpoints" / "best.ckpt")
        lit.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        if probed and tc.wise_alpha < 1:
            interpolate(lit.model, torch.load(probe, map_location="cpu", weights_only=True), tc.wise_alpha)
            log.info("WiSE-FT: weights = %.2f x fine-tuned + %.2f x linear probe", tc.wise_alpha, 1 - tc.wise_alpha)
        tidy_history(p.run_dir, history)
        plots.training_curves(history, p.run_dir / "curves.png")
    return Trained(model=lit.model.cpu().float().eval(), device=trainer.strategy.root_device, history=history,
                   epochs_run=trainer.current_epoch, train_seconds=train_seconds, feature_seconds=feature_seconds,
                   is_global_zero=trainer.is_global_zero, run_dir=Path(checkpoint.dirpath).parent)


def linear_probe(p: Prepared, class_weights: tuple[float, float], progress: Progress | None) -> None:
    """LP-FT's first stage (Kumar et al., ICLR 2022): fit the head alone on cached features of the
    pretrained backbone, in place. Fine-tuning from a random head lets its large early gradients
    distort the pretrained features, which costs accuracy away from the training distribution."""
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


def make_trainer(p: Prepared, checkpoint: ModelCheckpoint, callbacks: list, loggers: list) -> L.Trainer:
    tc = p.config.train
    several = tc.devices != 1 or tc.num_nodes > 1  # processes, i.e. DDP
    unfreezing = [ProgressiveUnfreezing(p.unfreeze_schedule, tc.backbone_lr)] if p.unfreeze_schedule else []
    limit = int(tc.max_train_batches) if tc.max_train_batches > 1 else tc.max_train_batches
    return L.Trainer(
        max_epochs=tc.epochs, accelerator="auto", devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision="32-true" if p.fast else resolve_precision(tc.precision),
        # one BatchNorm over the global batch, as in a single process; PyTorch syncs BN only on GPUs
        sync_batchnorm=several and torch.cuda.is_available(),
        callbacks=[EarlyStopping("val_loss", patience=tc.patience, mode="min"), checkpoint, *callbacks, *unfreezing],
        logger=[CSVLogger(p.run_dir, name="", version=log_version(p.run_dir)), *loggers], deterministic=False,
        enable_progress_bar=any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks),
        enable_model_summary=False, limit_train_batches=limit, log_every_n_steps=1, default_root_dir=p.run_dir,
    )


def write_run_folder(p: Prepared) -> None:
    """What makes a run repeatable from its folder alone: its config, its split manifest, its skips."""
    p.run_dir.mkdir(parents=True)
    data.write_manifest(p.samples, p.run_dir / "manifest.csv")
    data.write_skipped(p.skipped, p.run_dir / "skipped.csv")
    write_text(p.run_dir / "config.yaml", yaml.safe_dump(p.config.to_dict(), sort_keys=False))


def finalize(p: Prepared, t: Trained, *, report: bool = True) -> Path:
    """Calibrate and choose the operating point on validation only, save model.pt, measure val
    (and test, when the data has one), and write the report."""
    tc, dc, mc = p.config.train, p.config.data, p.config.model
    model = t.model
    val_samples, val_images = p.split_data["val"]
    val_y = np.array([s.label for s in val_samples])
    val_logits = predict_logits(model, val_images, device=t.device)
    temperature = calibration.fit_temperature(val_logits, val_y) if tc.calibration == "temperature" else 1.0
    model.temperature.fill_(temperature)
    val_prob = metrics.sigmoid(val_logits / temperature)
    threshold = calibration.choose_threshold(val_y, val_prob, tc.threshold)
    log.info("temperature %.3f (fitted on validation); threshold %.4f (rule %s)", temperature, threshold, tc.threshold)
    band = fit_unsure(val_y, val_prob, threshold, tc.unsure)
    detector = fit_ood(model, p.split_data, seed=tc.seed) if tc.ood else None

    training = artifact.TrainingInfo(
        epochs_run=t.epochs_run, best_epoch=best_epoch(t.history), seconds=round(t.train_seconds, 1),
        feature_seconds=round(t.feature_seconds, 1), fast_path=p.fast,
        seconds_per_epoch=round(t.train_seconds / max(t.epochs_run, 1), 2),
        n_train=len(p.split_data["train"][0]), n_val=len(val_samples))
    meta = artifact.make_meta(architecture=mc.backbone, head=mc.head, image_size=dc.image_size,
                              weights_info=p.weights_info, threshold=threshold, threshold_rule=tc.threshold,
                              config=p.config.to_dict(), training=training).replace(
        temperature=temperature, ood=detector, quality=gate.default_limits(dc.image_size).to_dict(), unsure=band,
        prior=calibration_prior(val_y, val_logits / temperature, "validation split"))
    # every file the weights, the temperature or the threshold were fitted on: evaluate warns on overlap
    seen = [s.path for split in ("train", "val") for s in p.split_data[split][0]]
    meta = meta.replace(data_digests=tuple(content_digests(seen)))
    artifact.save(p.run_dir / "model.pt", model, meta)
    evaluate.evaluate_predictions(val_y, val_prob, threshold, p.run_dir / "validation", [s.path for s in val_samples],
                                  unsure=band)

    shown = ("validation", val_samples, val_images, val_prob)
    if "test" in p.split_data:
        test_samples, test_images = p.split_data["test"]
        test_prob = metrics.sigmoid(predict_logits(model, test_images, device=t.device))
        result = evaluate.evaluate_predictions(np.array([s.label for s in test_samples]), test_prob, threshold,
                                               p.run_dir / "test", [s.path for s in test_samples], unsure=band)
        log.info("test: %s", evaluate.summary_line(result))
        shown = ("test", test_samples, test_images, test_prob)
    if report:
        write_run_report(p.run_dir, meta, model, *shown, n_skipped=len(p.skipped))
    return p.run_dir


def fit_unsure(y: np.ndarray, prob: np.ndarray, threshold: float, rule: str) -> dict | None:
    """The UNSURE band for ``ModelMeta.unsure`` from calibrated validation probabilities (rule
    ``conformal:<confidence>``, see ``conformal.conformal_band``), or None for rule ``none``. Fitted
    after the temperature and the threshold, on the same films: the band is of the probabilities
    the model will output, and contains the threshold it will use."""
    confidence = conformal.parse_unsure(rule)
    if confidence is None:
        return None
    if len(set(np.asarray(y).tolist())) < 2:
        log.warning("no UNSURE band: the validation split has a single class")
        return None
    band = conformal.conformal_band(y, prob, confidence, threshold)
    unsure = conformal.in_band(prob, band["low"], band["high"])
    log.info("UNSURE band [%.4f, %.4f) (Mondrian conformal, %g confidence, %d validation films): %d of them "
             "UNSURE", band["low"], band["high"], confidence, len(y), int(unsure.sum()))
    return band | {"rule": rule, "fitted_on": "validation split"}


def calibration_prior(y: np.ndarray, logits: np.ndarray, source: str) -> dict:
    """``ModelMeta.prior`` at training time: the PNEUMONIA share of the films the temperature was
    fitted on, the prevalence the calibrated probabilities are really posteriors at
    (``metrics.effective_prior``, where ``adapt`` shifts from) and the validation reference the
    drift monitor compares a site's films with (``metrics.validation_reference``).

    ``logits`` must be the calibrated logits themselves, not logit(sigmoid(...)) of them: a film
    whose probability rounds to 1.0 became +inf, the intercept fit's objective nan, and the bundled
    model recorded an effective prior of 0.997 instead of 0.553 (docs/pilot.md)."""
    y = np.asarray(y).astype(int)
    logits = np.asarray(logits, dtype=np.float64)
    return {"calibration": float(y.mean()), "effective": calibration.effective_prior(logits, y),
            "n_calibration": int(y.size), "calibration_source": source,
            "validation": calibration.validation_reference(logits, y)}


def fit_ood(model: models.Classifier, split_data: dict, *, seed: int, k: int | None = None) -> dict | None:
    """Fit the out-of-distribution detector on the trained model's own features and attach it
    as ``model.ood_head``; returns its description for ``ModelMeta.ood``.

    The covariance spans the training films plus shifted copies of a quarter of them (exposure,
    blur, noise, compression, borders, text): fitted on the films alone, it flagged 18.5% of mildly
    shifted held-out films, with them 1.7% (benchmarks/ood.md). The cut-offs come from validation
    films, patients the fit never saw; with fewer than ``ood.MIN_VALIDATION`` of them there is no
    detector (and the model card says so), since the cut-off would be noise.
    """
    (train_samples, train_images), (_, val_images) = split_data["train"], split_data["val"]
    if len(val_images) < ood.MIN_VALIDATION:
        log.warning("no out-of-distribution detector: %d validation films, at least %d are needed for its "
                    "cut-off", len(val_images), ood.MIN_VALIDATION)
        return None
    labels = np.array([s.label for s in train_samples])
    shifted, source = shifts.shifted_views(train_images, max(1, len(train_images) // 4), seed=seed)
    fit_images = np.concatenate([train_images, shifted])
    runner = features.embedding_runner(model, fit_images.shape[-1])  # one export for both passes
    state = ood.fit(features.embed(model, fit_images, runner=runner).numpy(), np.concatenate([labels, labels[source]]),
                    features.embed(model, val_images, runner=runner).numpy(), feature_source="model.embed", k=k)
    model.ood_head = ood.torch_module(state)
    return ood.describe(state)


def write_run_report(run_dir: Path, meta: artifact.ModelMeta, model: models.Classifier, split: str,
                     samples: list[data.Sample], images: np.ndarray, prob: np.ndarray, *, n_skipped: int = 0) -> Path:
    """``run_dir/report.html`` on the test split (else validation), with Grad-CAM galleries of its errors."""
    from pneumoscan.evaluation import report

    y = np.array([s.label for s in samples])
    paths = [s.path for s in samples]
    evaluate.write_errors(model, meta, images, y, prob, meta.threshold, paths, run_dir / split)
    source = {"model": str(run_dir / "model.pt"), "data": meta.config["data"]["root"], "split": split,
              "n_skipped": n_skipped, "threshold_source": calibration.describe_rule(meta.threshold_rule)}
    return report.write_report(run_dir / split, meta, source, run_dir=run_dir, path=run_dir / "report.html")


def best_epoch(history_csv: Path) -> int | None:
    with open(history_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    if not rows:
        return None
    return int(min(rows, key=lambda r: float(r["val_loss"]) if not math.isnan(float(r["val_loss"])) else math.inf)["epoch"])
