"""Finding and splitting chest X-rays: scanning layouts, patients, grouped splits, manifests, datasets.

The Kaggle layout is ``<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. Its val split has 16
images, too few to stop early on, and one patient often has several images, so every split made
here is grouped by patient: an image of a patient seen in training would make validation and test
scores optimistic. Images are decoded once into one uint8 array, so epochs never touch the disk.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumoscan import CLASS_NAMES
from pneumoscan.io import imaging
from pneumoscan.core.config import CLASS_WEIGHT_MODES
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import write_csv

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "class_name", "patient", "split")


@dataclass(frozen=True)
class Sample:
    path: str  # as found (absolute or relative as given by root)
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient: str
    split: str  # "train" | "val" | "test"


# ----------------------------------------------------------------------------- patients

_PERSON = re.compile(r"^person(\d+)(?=[_\-.\s]|$)", re.IGNORECASE)
_IM = re.compile(r"^(?:normal2-)?im-(\d+)(?=[_\-.\s]|$)", re.IGNORECASE)


def patient_id(name: str | os.PathLike) -> str:
    """Group key for a file, so splits never put one patient's images on both sides.

    Kaggle names encode the patient (``person1000_bacteria_2931``, ``IM-0115-0001``,
    ``NORMAL2-IM-0135-0001``). An unrecognised name is its own group: without a patient key the
    safest assumption available is one image per patient.
    """
    stem = Path(name).stem
    if m := _PERSON.match(stem):
        return f"person{m.group(1)}"
    if m := _IM.match(stem):
        return f"IM-{m.group(1)}"
    return stem


# ----------------------------------------------------------------------------- scanning


def _subdirs(folder: Path) -> dict[str, Path]:
    """Visible subfolders keyed by lower-cased name; two names differing only in case are ambiguous."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        key = p.name.lower()
        if key in found:
            raise UserError(f"{folder}: both {found[key].name}/ and {p.name}/ exist; keep one")
        found[key] = p
    return found


def _class_images(folder: Path, label: int, split: str) -> list[Sample]:
    """The images of one class folder; what it passes over (subfolders, other files) is named in
    one warning, because a forgotten NORMAL/extra/ silently changes the data."""
    samples, left_out = [], []
    for p in sorted(folder.iterdir()):
        reason = imaging.leave_out_reason(p)
        if reason is None:
            samples.append(Sample(str(p), label, patient_id(p.name), split))
        elif reason != "hidden":
            left_out.append(f"{p.name}{'/' if p.is_dir() else ''} ({reason})")
    if left_out:
        log.warning("%s: left out %d entr%s that %s not image files (class folders are not searched "
                    "recursively): %s", folder, len(left_out), "y" if len(left_out) == 1 else "ies",
                    "is" if len(left_out) == 1 else "are", imaging.truncate(left_out))
    if not samples:
        raise UserError(f"no images in {folder}")
    return samples


def _class_folders(folder: Path, split: str) -> list[Sample]:
    dirs = _subdirs(folder)
    samples = []
    for label, name in enumerate(CLASS_NAMES):
        sub = dirs.get(name.lower())
        if sub is None:
            raise UserError(f"missing class folder {folder / name}")
        samples += _class_images(sub, label, split)
    return samples


def scan(root: str | os.PathLike, default_split: str = "train") -> list[Sample]:
    """List the labelled images under ``root``, in either the Kaggle split layout or plain class folders.

    Both classes must be present in every split found: a split with one class cannot be scored,
    and failing here is cheaper than failing after decoding thousands of images.
    """
    if default_split not in SPLITS:
        raise UserError(f"unknown split {default_split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(root)
    if not root.exists():
        raise UserError(f"data root not found: {root}")
    if not root.is_dir():
        raise UserError(f"data root is not a directory: {root}")

    dirs = _subdirs(root)
    if any(s in dirs for s in SPLITS):
        samples = []
        for split in SPLITS:
            if split in dirs:
                samples += _class_folders(dirs[split], split)
    elif any(c.lower() in dirs for c in CLASS_NAMES):
        samples = _class_folders(root, default_split)
    else:
        found = ", ".join(sorted(dirs)) or "no folders"
        raise UserError(
            f"{root}: expected split folders train/ val/ test/ holding NORMAL/ and PNEUMONIA/, "
            f"or class folders NORMAL/ and PNEUMONIA/; found {found}"
        )
    log.info("found %d images in %s: %s", len(samples), root, _counts(samples))
    return samples


# ----------------------------------------------------------------------------- splitting


def _counts(samples: Iterable[Sample]) -> str:
    """'train 4708 (1207 NORMAL / 3501 PNEUMONIA), ...' for log lines."""
    c = Counter((s.split, s.label) for s in samples)
    parts = []
    for split in SPLITS:
        n = [c[split, label] for label in range(len(CLASS_NAMES))]
        if sum(n):
            parts.append(f"{split} {sum(n)} ({' / '.join(f'{k} {name}' for k, name in zip(n, CLASS_NAMES))})")
    return ", ".join(parts) or "none"


def _grouped_kfold(samples: Sequence[Sample], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    from sklearn.model_selection import StratifiedGroupKFold  # slow import; only splits need it

    if k < 2:
        raise UserError(f"need at least 2 folds, got {k}")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    for label, name in enumerate(CLASS_NAMES):
        n = len(set(groups[labels == label]))
        if n < k:
            raise UserError(f"cannot split into {k} patient-grouped folds: only {n} {name} patients")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr.tolist(), te.tolist()) for tr, te in cv.split(np.zeros(len(samples)), labels, groups)]


def _carve(samples: list[Sample], pool: list[int], fraction: float, seed: int, split_name: str) -> list[Sample]:
    """Move one patient-grouped stratified fold (~fraction) of ``samples[pool]`` into ``split_name``."""
    if not 0 < fraction < 1:
        raise UserError(f"split fraction must be between 0 and 1, got {fraction}")
    k = max(2, round(1 / fraction))  # the fold is 1/k of the pool: 0.1 -> 10 folds
    _, fold = _grouped_kfold([samples[i] for i in pool], k, seed)[0]
    moved = {pool[j] for j in fold}
    return [dataclasses.replace(s, split=split_name) if i in moved else s for i, s in enumerate(samples)]


def _check_disjoint(samples: Sequence[Sample]) -> None:
    """Warn about patients in more than one split: their scores would be optimistic."""
    splits: dict[str, set[str]] = {}
    for s in samples:
        splits.setdefault(s.patient, set()).add(s.split)
    shared = sorted(p for p, ss in splits.items() if len(ss) > 1)
    if shared:
        log.warning(
            "%d patients have images in more than one split (%s); their scores will be optimistic",
            len(shared),
            imaging.truncate(shared),
        )


def assign_validation(
    samples: Sequence[Sample], *, val_fraction: float = 0.1, min_val_images: int = 100, seed: int = 42
) -> list[Sample]:
    """Make a validation split large enough to stop early and pick thresholds on.

    Kaggle's own val has 16 images, so when val is smaller than ``min_val_images`` it is merged
    into train and a stratified, patient-grouped ~``val_fraction`` of train becomes val. Test is
    never touched.
    """
    samples = list(samples)
    n_val = sum(s.split == "val" for s in samples)
    if n_val >= min_val_images:
        log.info("using the dataset's validation split (%d images)", n_val)
        _check_disjoint(samples)
        return samples

    merged = [dataclasses.replace(s, split="train") if s.split == "val" else s for s in samples]
    pool = [i for i, s in enumerate(merged) if s.split == "train"]
    out = _carve(merged, pool, val_fraction, seed, "val")
    log.info(
        "validation: dataset's val has %d < %d images; merged it into train and carved a patient-grouped "
        "%.0f%% (seed %d): %s",
        n_val,
        min_val_images,
        100 * val_fraction,
        seed,
        _counts(out),
    )
    _check_disjoint(out)
    return out


def grouped_folds(samples: Sequence[Sample], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Indices (train, held-out) of k stratified folds with every patient on one side only."""
    return _grouped_kfold(list(samples), k, seed)


def holdout_split(samples: Sequence[Sample], fraction: float, seed: int, split_name: str = "test") -> list[Sample]:
    """Move a patient-grouped stratified ~``fraction`` of train into ``split_name``.

    For datasets without a test split. The fraction is rounded to 1/k (0.15 -> 1/7) because the
    split is one fold of a StratifiedGroupKFold, the one stratified grouped splitter sklearn has.
    """
    if split_name not in SPLITS:
        raise UserError(f"unknown split {split_name!r}; expected one of {', '.join(SPLITS)}")
    samples = list(samples)
    pool = [i for i, s in enumerate(samples) if s.split == "train"]
    out = _carve(samples, pool, fraction, seed, split_name)
    log.info("held out %.0f%% of train as %s (seed %d): %s", 100 * fraction, split_name, seed, _counts(out))
    return out


# ----------------------------------------------------------------------------- decoding


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Sample], np.ndarray, list[tuple[str, str]]]:
    """Decode every image once into one (N, size, size) uint8 array: (kept samples, images, skipped)."""
    kept, decoded = decode_samples(samples, size, strict=strict, progress=progress)
    return kept, decoded.images, decoded.skipped


def decode_samples(samples: Sequence[Sample], size: int, *, strict: bool = False,
                   progress: Callable[[int], None] | None = None) -> tuple[list[Sample], imaging.Decoded]:
    """The kept samples and their ``imaging.Decoded`` (images, skipped files, stored sizes).

    Unreadable files are skipped and listed unless ``strict``; a class left with no readable
    image is an error, since nothing could be learned or scored for it.
    """
    samples = list(samples)
    decoded = imaging.decode_many([s.path for s in samples], size, strict=strict, progress=progress)
    kept_samples = [samples[i] for i in decoded.kept]
    have = Counter(s.label for s in kept_samples)
    for label in sorted({s.label for s in samples}):
        if have[label] == 0:
            raise UserError(f"no readable {CLASS_NAMES[label]} images: all of them were skipped as unreadable")
    return kept_samples, decoded


class ImageDataset(torch.utils.data.Dataset):
    """Items from the decoded array, sharing its memory: workers fork instead of copying ~260 MB."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if self.images.dtype != torch.uint8 or self.images.ndim != 3:
            raise ValueError(f"images must be uint8 (N, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].unsqueeze(0)  # (1, H, W) uint8 view
        if self.transform is not None:
            x = self.transform(x)  # on uint8: cheaper, and what the augmentation was written for
        return x.float().div_(255), self.labels[i]


def class_weights(labels: Iterable[int], mode: str = "balanced") -> tuple[float, float]:
    """Loss weights (w_normal, w_pneumonia); "balanced" is sklearn's n / (2 * count)."""
    if mode == "none":
        return (1.0, 1.0)
    if mode != "balanced":
        raise UserError(f"unknown class-weight mode {mode!r}; choose one of: {', '.join(CLASS_WEIGHT_MODES)}")
    labels = np.asarray(list(labels), dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise UserError(f"labels must be 0 ({CLASS_NAMES[0]}) or 1 ({CLASS_NAMES[1]})")
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    for name, n in zip(CLASS_NAMES, counts):
        if n == 0:
            raise UserError(f"cannot balance class weights: no {name} samples")
    w = len(labels) / (len(CLASS_NAMES) * counts)
    return (float(w[0]), float(w[1]))


# ----------------------------------------------------------------------------- manifests


def write_manifest(samples: Iterable[Sample], path: str | os.PathLike) -> None:
    """Record exactly which file went to which split, so a run's splits can be audited and reused."""
    rows = ((s.path, s.label, CLASS_NAMES[s.label], s.patient, s.split) for s in samples)
    write_csv(path, MANIFEST_COLUMNS, rows)


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Samples from a manifest, checked row by row: a hand-edited label must not slip through silently."""
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read manifest {path}: {e.strerror or e}") from None
    samples = []
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: not a manifest, missing columns {', '.join(missing)}")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise UserError(f"{where}: label {row['label']!r} is not 0 or 1") from None
            if label not in (0, 1) or row["class_name"] != CLASS_NAMES[label]:
                raise UserError(f"{where}: label {row['label']!r} does not match class_name {row['class_name']!r}")
            if row["split"] not in SPLITS:
                raise UserError(f"{where}: unknown split {row['split']!r}")
            samples.append(Sample(row["path"], label, row["patient"], row["split"]))
    return samples


def write_skipped(skipped: Iterable[tuple[str, str]], path: str | os.PathLike) -> None:
    """The unreadable files of a run, for someone to fix or remove."""
    write_csv(path, ("path", "reason"), skipped)
