"""``pneumoscan ensemble``: several trained runs become one multi-member ``model.pt``.

A deep ensemble (Lakshminarayanan et al. 2017) averages models that differ in what they start
from or what they train (e.g. a frozen-backbone MobileNetV2 and a fine-tuned one); its mistakes
are fewer and its confidence more honest than any member's. ``models.Ensemble`` averages the
members' calibrated logits; this module fits what belongs to the ensemble as a whole, exactly as
``train.finalize`` does for one model and on the same data: the temperature and the threshold on
the validation split, and the out-of-distribution detector on the concatenated features of the
training films (cut-offs from validation).

That is only honest if every member saw the same validation films as validation (a film one
member trained on would look easy to the ensemble's calibration), so the runs must share their
validation rows exactly, and their image size; anything else is a UserError naming the
difference. Each run folder is what ``train.fit`` writes: ``model.pt``, ``config.yaml`` and
``manifest.csv`` (the manifest's paths are decoded again, as the run recorded them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml

from pneumoscan.modeling import artifact, models
from pneumoscan.io import data
from pneumoscan.evaluation import evaluate
from pneumoscan.training import calibrate, features, train
from pneumoscan.safety import gate
from pneumoscan.core import metrics
from pneumoscan.modeling.artifact import Member, ModelMeta
from pneumoscan.core.errors import UserError
from pneumoscan.core.config import RunConfig, member_config, member_names
from pneumoscan.core.files import file_sha256, write_csv, write_text
from pneumoscan.inference.torch_model import predict_logits
from pneumoscan.evaluation.results import Evaluation
from pneumoscan.training.results import RunResult

log = logging.getLogger(__name__)

COMBINATION = "mean-logit"  # ModelMeta.head of an ensemble: how its members' logits combine
RUN_FILES = ("model.pt", "config.yaml", "manifest.csv")


def _read_run(run_dir: Path) -> tuple[models.Classifier, ModelMeta, dict, list[data.Sample]]:
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a run folder: no {', '.join(missing)} (pneumoscan train writes them)")
    model, meta = artifact.load(run_dir / "model.pt")
    if meta.is_ensemble:
        raise UserError(f"{run_dir / 'model.pt'} is already an ensemble; combine its member runs instead")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{run_dir / 'config.yaml'} is not valid YAML ({type(exc).__name__})") from None
    return model, meta, config, data.read_manifest(run_dir / "manifest.csv")


def _rows(samples: Sequence[data.Sample], split: str) -> dict[str, int]:
    return {s.path: s.label for s in samples if s.split == split}


def check_compatible(run_dirs: Sequence[Path], metas: Sequence[ModelMeta],
                     manifests: Sequence[list[data.Sample]]) -> None:
    """UserError unless every run has the first one's image size, class names and validation rows."""
    first, first_val = run_dirs[0], _rows(manifests[0], "val")
    for run_dir, meta, manifest in zip(run_dirs[1:], metas[1:], manifests[1:]):
        if meta.image_size != metas[0].image_size:
            raise UserError(f"image sizes differ: {run_dir} was trained at {meta.image_size} px, {first} at "
                            f"{metas[0].image_size} px; an ensemble scores one input size")
        if meta.class_names != metas[0].class_names:
            raise UserError(f"class names differ: {run_dir} has {meta.class_names}, {first} {metas[0].class_names}")
        val = _rows(manifest, "val")
        if val == first_val:
            continue
        extra, lacking = sorted(set(val) - set(first_val)), sorted(set(first_val) - set(val))
        relabelled = sorted(p for p in set(val) & set(first_val) if val[p] != first_val[p])
        parts = [f"{len(extra)} images {first.name} does not (e.g. {extra[0]})" if extra else "",
                 f"lacks {len(lacking)} of {first.name}'s (e.g. {lacking[0]})" if lacking else "",
                 f"labels {len(relabelled)} differently (e.g. {relabelled[0]})" if relabelled else ""]
        raise UserError(f"validation splits differ: {run_dir}'s manifest.csv has "
                        f"{'; '.join(p for p in parts if p)}. The ensemble's temperature and threshold are "
                        "fitted on validation, so every member must have held out the same images: train them "
                        "with the same data.root, data.val_fraction and train.seed")


def _check_files(samples: Sequence[data.Sample], run_dir: Path) -> None:
    """UserError when manifest paths point nowhere: relative paths are as training saw them, so
    running from another folder (or after the data moved) would otherwise skip every image."""
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(samples)} images named in the runs' manifest.csv are not "
                        f"found (e.g. {missing[0]}, from {run_dir / 'manifest.csv'}); relative paths are as training "
                        "saw them: run from the folder training ran in, or restore the data there")


def _member(run_dir: Path, meta: ModelMeta, config: dict) -> Member:
    return Member(architecture=meta.architecture, head=meta.head, normalization=meta.normalization,
                  tf_same_padding=meta.tf_same_padding, temperature=meta.temperature,
                  backbone_weights=dict(meta.backbone_weights), config=config,
                  source={"run": str(run_dir), "model_sha256": file_sha256(run_dir / "model.pt"),
                          "threshold": meta.threshold, "threshold_rule": meta.threshold_rule,
                          "n_train": meta.training.n_train, "n_val": meta.training.n_val})


def combine(run_dirs: Sequence[str | Path], out_dir: str | Path, **options) -> Path:
    """``combine_result`` (same arguments), returning only ``out_dir``: the ``ensemble`` command's."""
    return combine_result(run_dirs, out_dir, **options).run_dir


def combine_result(run_dirs: Sequence[str | Path], out_dir: str | Path, *, threshold_rule: str | None = None,
                   ood: bool | None = None, seed: int = 0, strict: bool = False, unsure_rule: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Write ``out_dir/model.pt``, the ensemble of the runs' models, with ``validation/`` (its
    evaluation on the shared validation split, each member's ROC-AUC and Brier score beside it)
    and ``manifest.csv`` (the images its temperature, threshold and OOD detector were fitted on).

    ``threshold_rule``: the operating point's rule (default: the first run's); ``ood``: fit an
    out-of-distribution detector (default: when any member has one); ``unsure_rule``: the UNSURE
    band's rule (default: the first run's ``train.unsure``). Returns ``out_dir`` with the
    validation evaluation and the ensemble's meta.
    """
    started = time.perf_counter()
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise UserError(f"an ensemble needs at least two runs, got {len(run_dirs)}")
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise UserError("the same run is named twice: its members would be identical")
    out = Path(out_dir)
    if (out / "model.pt").exists():
        raise UserError(f"{out / 'model.pt'} exists; choose another --out folder")
    runs = [_read_run(r) for r in run_dirs]
    nets, metas, configs, manifests = (list(column) for column in zip(*runs))
    check_compatible(run_dirs, metas, manifests)
    rule = threshold_rule or metas[0].threshold_rule
    with_ood = any(m.ood is not None for m in metas) if ood is None else ood
    size = metas[0].image_size

    for net in nets:
        net.ood_head = None  # the ensemble has one detector, on all members' features
    ensemble = models.Ensemble(nets, [m.architecture for m in metas]).eval()

    val_rows = [s for s in manifests[0] if s.split == "val"]
    train_rows = list({s.path: s for manifest in manifests for s in manifest if s.split == "train"}.values())
    _check_files(val_rows + (train_rows if with_ood else []), run_dirs[0])
    decode = (lambda name, n: (lambda k: progress(f"decoding {name} images", k, n))) if progress else (lambda *_: None)
    val_samples, val_images, skipped = data.load_images(val_rows, size, strict=strict,
                                                        progress=decode("validation", len(val_rows)))
    with torch.inference_mode():
        per_member = ensemble.member_logits(features.embed(ensemble, val_images)).numpy().astype(np.float64)
    split_data = {"val": (val_samples, val_images)}
    train_samples = []
    if with_ood:
        train_samples, train_images, train_skipped = data.load_images(
            train_rows, size, strict=strict, progress=decode("training", len(train_rows)))
        skipped += train_skipped
        split_data["train"] = (train_samples, train_images)
    # the members' own UNSURE rule (first run's), refitted for the ensemble's probabilities; the OOD
    # detector's PCA to the widest member's width: members sharing a frozen backbone give the same
    # features twice, and the full square precision would double the model file for nothing
    unsure_rule = (configs[0].get("train") or {}).get("unsure", "none") if unsure_rule is None else unsure_rule
    cal = calibrate.calibrate(ensemble, per_member.mean(axis=1), split_data, threshold_rule=rule,
                              unsure_rule=unsure_rule, with_ood=with_ood, seed=seed,
                              ood_k=max(net.feature_dim for net in nets))
    temperature, threshold, band = cal.temperature, cal.threshold, cal.unsure
    log.info("ensemble of %d: fitted on %d validation images", len(nets), len(val_samples))
    digests = sorted({d for m in metas for d in m.data_digests})
    if any(not m.data_digests for m in metas):
        log.warning("a member records no training-data digests: evaluate cannot warn about every image the "
                    "ensemble has seen")
    meta = ModelMeta(
        architecture=artifact.ENSEMBLE, head=COMBINATION, image_size=size, normalization=artifact.PER_MEMBER,
        threshold=float(threshold), threshold_rule=rule, temperature=temperature, class_names=metas[0].class_names,
        config={"ensemble": {"runs": [str(r) for r in run_dirs], "threshold_rule": rule, "ood": with_ood,
                             "seed": seed},
                "data": dict(configs[0].get("data") or {})},
        training=artifact.TrainingInfo(seconds=round(time.perf_counter() - started, 1),
                                       n_train=len(train_rows), n_val=len(val_samples)),
        torch_version=str(torch.__version__), ood=cal.ood,
        quality=metas[0].quality or gate.default_limits(size).to_dict(), data_digests=tuple(digests),
        members=tuple(_member(r, m, c) for r, m, c in zip(run_dirs, metas, configs)), unsure=band, prior=cal.prior)
    out.mkdir(parents=True, exist_ok=True)
    artifact.save(out / "model.pt", ensemble, meta)
    data.write_manifest([*train_samples, *val_samples] if with_ood else val_samples, out / "manifest.csv")
    if skipped:
        data.write_skipped(skipped, out / "skipped.csv")
    validation = _write_validation(out, run_dirs, metas, per_member, val_samples, cal, rule)
    return RunResult(out, {"validation": validation}, meta=meta)


def _write_validation(out: Path, run_dirs: list[Path], metas: list[ModelMeta], per_member: np.ndarray,
                      val_samples: list[data.Sample], cal: calibrate.Calibration, rule: str) -> Evaluation:
    """``out/validation/`` (the ensemble on the shared validation split, each member's ROC-AUC and
    Brier score beside it) and ``out/members.csv``."""
    y_val, val_prob, threshold, band = (np.array([s.label for s in val_samples]), cal.val_prob, cal.threshold,
                                        cal.unsure)
    member_rows = [{"run": str(r), "architecture": m.architecture, "head": m.head,
                    "roc_auc": metrics.binary_metrics(y_val, metrics.sigmoid(z), m.threshold)["roc_auc"],
                    "brier": metrics.brier(y_val, metrics.sigmoid(z))}
                   for r, m, z in zip(run_dirs, metas, per_member.T)]
    result = evaluate.evaluate_predictions(y_val, val_prob, threshold, out / "validation",
                                           [s.path for s in val_samples], extra={"members": member_rows}, unsure=band,
                                           threshold_rule=rule)
    write_csv(out / "members.csv", ["run", "architecture", "head", "val_roc_auc", "val_brier"],
              [(r["run"], r["architecture"], r["head"], f"{r['roc_auc']:.4f}", f"{r['brier']:.4f}")
               for r in member_rows])
    log.info("validation ROC-AUC: ensemble %.4f; members %s", result.metrics.roc_auc,
             ", ".join(f"{r['roc_auc']:.4f}" for r in member_rows))
    return result


def fit(config: RunConfig, *, resume_dir: str | Path | None = None, progress=None,
        callbacks_for: Callable[[], list] | None = None, started: Callable[[Path], None] | None = None,
        samples: list[data.Sample] | None = None, images: np.ndarray | None = None,
        report: bool = True) -> RunResult:
    """What `pneumoscan train` and `cv` run: ``fit_members`` for an ensemble recipe (or when
    resuming a run that has ``members/``), else ``train.fit_result``. ``started`` is for the
    ensemble's own folder only: a single run hands its folder to its callbacks itself. ``samples``,
    ``images`` and ``report`` are as ``train.fit``'s (cross-validation folds). Returns the run
    folder with what it measured (``RunResult``)."""
    if (Path(resume_dir) / "members").is_dir() if resume_dir is not None else config.train.members:
        return fit_members(config, resume_dir=resume_dir, progress=progress, callbacks_for=callbacks_for,
                           started=started, samples=samples, images=images, report=report)
    return train.fit_result(config, resume_dir=resume_dir, callbacks=callbacks_for() if callbacks_for else None,
                            progress=progress, samples=samples, images=images, report=report)


def fit_members(config: RunConfig, *, resume_dir: str | Path | None = None, progress=None,
                callbacks_for: Callable[[], list] | None = None, started: Callable[[Path], None] | None = None,
                samples: list[data.Sample] | None = None, images: np.ndarray | None = None,
                report: bool = True) -> RunResult:
    """``train.members``: train one run per member recipe on the same data and split, in
    ``RUN/members/NAME``, then write their ensemble to ``RUN/model.pt``. Resuming skips members
    that finished and resumes one that was interrupted, so a long ensemble run loses at most one
    member's last epoch. ``started`` is called with the run folder once it exists. ``samples``,
    ``images`` and ``report`` are passed to every member's ``train.fit`` (cross-validation folds),
    and the test split is scored from ``images`` instead of being decoded again. Returns the run
    folder with the ensemble's evaluations and each member's (``RunResult.members``)."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume: {run_dir / 'config.yaml'} not found")
        config = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if (run_dir / "model.pt").exists():
            raise UserError(f"{run_dir} is finished: its ensemble model.pt exists")
    else:
        config.validate()
        run_dir = train.new_run_dir(config)
        run_dir.mkdir(parents=True)
        write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if started:  # e.g. the CLI's train.log, in the ensemble's folder rather than a member's
        started(run_dir)
    names = member_names(config.train.members)
    log.info("ensemble run %s: members %s", run_dir, ", ".join(names))
    members: dict[str, RunResult] = {}
    for name in names:
        folder = run_dir / "members" / name
        callbacks = callbacks_for() if callbacks_for else None
        if (folder / "model.pt").is_file():
            log.info("member %s: finished earlier, kept", name)
            members[name] = RunResult.load(folder)
        elif (folder / "checkpoints" / "last.ckpt").is_file():
            members[name] = train.fit_result(member_config(config, name, str(run_dir / "members")),
                                             resume_dir=folder, progress=progress, callbacks=callbacks, report=False)
        else:
            if folder.exists():  # interrupted before its first checkpoint: start it again
                import shutil

                shutil.rmtree(folder)
            members[name] = train.fit_result(member_config(config, name, str(run_dir / "members")),
                                             progress=progress, callbacks=callbacks, samples=samples, images=images,
                                             report=False)
    done = [m.run_dir for m in members.values()]
    combined = combine_result(done, run_dir, seed=config.train.seed, progress=progress)
    evaluations = dict(combined.evaluations)
    test_rows = [s for s in data.read_manifest(done[0] / "manifest.csv") if s.split == "test"]
    if test_rows:  # as train.finalize: measure the test split once, and report on it
        model, meta = artifact.load(run_dir / "model.pt")
        if images is not None and samples is not None:
            row_of = {s.path: i for i, s in enumerate(samples)}
            test_images, skipped = images[np.array([row_of[s.path] for s in test_rows])], []
        else:
            test_rows, test_images, skipped = data.load_images(test_rows, meta.image_size)
        prob = metrics.sigmoid(predict_logits(model, test_images))
        y = np.array([s.label for s in test_rows])
        result = evaluate.evaluate_predictions(y, prob, meta.threshold, run_dir / "test", [s.path for s in test_rows],
                                               unsure=meta.unsure, threshold_rule=meta.threshold_rule)
        log.info("test: %s", evaluate.summary_line(result))
        evaluations["test"] = result
        if report:
            train.write_run_report(run_dir, meta, model, "test", test_rows, test_images, prob,
                                   n_skipped=len(skipped))
    return RunResult(run_dir, evaluations, members, meta=combined.meta)
