"""Training a classifier: prepare the run, train it, then calibrate and save it.

``fit`` turns a ``RunConfig`` into a run folder that can be understood and repeated on its own:
config.yaml, manifest.csv (every file with its split), skipped.csv, history.csv, curves.png,
checkpoints/ (best and last, for --resume), model.pt, validation.json and, when the data has a
test split, test/ with its evaluation, then report.html (one self-contained page on the test
split, else validation, with Grad-CAM galleries of its most confident errors). Temperature and
threshold are fitted on the validation split only; the test split is only ever measured.

The Lightning module is in ``training.litmodule``, the loaders in ``training.loaders``, LP-FT and
WiSE-FT in ``training.finetune`` and what is fitted on validation in ``training.calibrate``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from pneumoscan.modeling import artifact, models, transforms
from pneumoscan.io import data
from pneumoscan.evaluation import evaluate, plots
from pneumoscan.safety import gate
from pneumoscan.core import calibration, metrics
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import atomic_path, content_digests, write_csv, write_text
from pneumoscan.inference.torch_model import predict_logits
from pneumoscan.training.calibrate import calibrate
from pneumoscan.training.finetune import interpolate, linear_probe
from pneumoscan.training.litmodule import LitClassifier, ProgressiveUnfreezing, resolve_precision
from pneumoscan.training.loaders import Progress, by_split, feature_loaders, make_loader, split_samples
from pneumoscan.training.results import RunResult

log = logging.getLogger(__name__)


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


def log_version(run_dir: Path) -> str:
    """``logs`` for a new run, ``logs-2``, ``logs-3``... for each resume, so no history is overwritten."""
    n = 1
    while (run_dir / ("logs" if n == 1 else f"logs-{n}")).exists():
        n += 1
    return "logs" if n == 1 else f"logs-{n}"


def fit(config: RunConfig, *, resume_dir: str | Path | None = None, callbacks: list | None = None,
        progress: Progress | None = None, loggers: list | None = None,
        samples: list[data.Sample] | None = None, images: np.ndarray | None = None,
        report: bool = True) -> Path:
    """Train, calibrate, choose the threshold, save model.pt; returns the run folder
    (``fit_result``, with the same arguments, also returns what the run measured).

    ``loggers`` (e.g. an MLFlowLogger) receive the epoch metrics besides the run folder's CSV log.
    ``samples`` (with their splits) replaces scanning ``config.data.root``, for cross-validation;
    ``images`` are those samples already decoded (cross-validation decodes once for all folds);
    ``report=False`` skips the HTML report and its Grad-CAM galleries (cross-validation folds).
    """
    return fit_result(config, resume_dir=resume_dir, callbacks=callbacks, progress=progress, loggers=loggers,
                      samples=samples, images=images, report=report).run_dir


def fit_result(config: RunConfig, *, resume_dir: str | Path | None = None, callbacks: list | None = None,
               progress: Progress | None = None, loggers: list | None = None,
               samples: list[data.Sample] | None = None, images: np.ndarray | None = None,
               report: bool = True) -> RunResult:
    """``fit``, returning the run folder with its typed evaluations and meta (cv, experiments)."""
    prepared = prepare(config, resume_dir=resume_dir, samples=samples, images=images, progress=progress)
    trained = train_model(prepared, callbacks=callbacks, loggers=loggers, progress=progress)
    if not trained.is_global_zero:
        return RunResult(trained.run_dir)  # under DDP, rank 0 calibrates, saves and evaluates
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


def finalize(p: Prepared, t: Trained, *, report: bool = True) -> RunResult:
    """Calibrate and choose the operating point on validation only, save model.pt, measure val
    (and test, when the data has one), and write the report."""
    tc, dc, mc = p.config.train, p.config.data, p.config.model
    model = t.model
    val_samples, val_images = p.split_data["val"]
    val_y = np.array([s.label for s in val_samples])
    val_logits = predict_logits(model, val_images, device=t.device)
    cal = calibrate(model, val_logits, p.split_data, threshold_rule=tc.threshold, unsure_rule=tc.unsure,
                    temperature=tc.calibration == "temperature", with_ood=tc.ood, seed=tc.seed)
    temperature, threshold, band, val_prob = cal.temperature, cal.threshold, cal.unsure, cal.val_prob

    training = artifact.TrainingInfo(
        epochs_run=t.epochs_run, best_epoch=best_epoch(t.history), seconds=round(t.train_seconds, 1),
        feature_seconds=round(t.feature_seconds, 1), fast_path=p.fast,
        seconds_per_epoch=round(t.train_seconds / max(t.epochs_run, 1), 2),
        n_train=len(p.split_data["train"][0]), n_val=len(val_samples))
    meta = artifact.make_meta(architecture=mc.backbone, head=mc.head, image_size=dc.image_size,
                              weights_info=p.weights_info, threshold=threshold, threshold_rule=tc.threshold,
                              config=p.config.to_dict(), training=training).replace(
        temperature=temperature, ood=cal.ood, quality=gate.default_limits(dc.image_size).to_dict(), unsure=band,
        prior=cal.prior)
    # every file the weights, the temperature or the threshold were fitted on: evaluate warns on overlap
    seen = [s.path for split in ("train", "val") for s in p.split_data[split][0]]
    meta = meta.replace(data_digests=tuple(content_digests(seen)))
    artifact.save(p.run_dir / "model.pt", model, meta)
    evaluations = {"validation": evaluate.evaluate_predictions(
        val_y, val_prob, threshold, p.run_dir / "validation", [s.path for s in val_samples], unsure=band,
        threshold_rule=tc.threshold)}

    shown = ("validation", val_samples, val_images, val_prob)
    if "test" in p.split_data:
        test_samples, test_images = p.split_data["test"]
        test_prob = metrics.sigmoid(predict_logits(model, test_images, device=t.device))
        result = evaluate.evaluate_predictions(np.array([s.label for s in test_samples]), test_prob, threshold,
                                               p.run_dir / "test", [s.path for s in test_samples], unsure=band,
                                               threshold_rule=tc.threshold)
        log.info("test: %s", evaluate.summary_line(result))
        evaluations["test"] = result
        shown = ("test", test_samples, test_images, test_prob)
    if report:
        write_run_report(p.run_dir, meta, model, *shown, n_skipped=len(p.skipped))
    return RunResult(p.run_dir, evaluations, meta=meta)


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
