"""Look at a dataset before training on it.

The public chest X-ray set has traps that silently inflate scores: a tiny val split, several
images per patient, exact duplicate files, and a 3:1 class imbalance. ``explore`` counts all of
them and writes the evidence (CSVs, two figures, a markdown summary) so they are seen, not assumed.
Only file headers are read for the size statistics, so it runs in seconds on the full dataset.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.io import data, imaging
from pneumoscan.evaluation import plots
from pneumoscan.core.errors import ImageError
from pneumoscan.core.files import file_sha256, write_csv, write_text

log = logging.getLogger(__name__)


def explore(
    data_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    n_samples: int = 8,
    seed: int = 0,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Describe ``data_root`` in ``out_dir`` and return the headline numbers (JSON-serialisable).

    ``image_size`` resizes the images in samples.png; None shows each at its own size.
    """
    samples = data.scan(data_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    counts, patients = _counts(samples)
    write_csv(out / "counts.csv", ["split", "class", "images", "patients"],
              [(split, name, n, patients[split][name]) for split, row in counts.items() for name, n in row.items()])
    plots.class_counts_bar(counts, out / "class_counts.png")

    sample_split = "train" if "train" in counts else next(iter(counts))
    _sample_figure(samples, sample_split, n_samples, seed, image_size, out / "samples.png")

    stats = [_image_info(s) for s in samples]
    write_csv(out / "image_stats.csv", ["path", "split", "class", "width", "height", "mode", "bytes", "error"],
              [[r[k] for k in ("path", "split", "class", "width", "height", "mode", "bytes", "error")] for r in stats])

    groups = _duplicate_groups(samples, [r["bytes"] for r in stats])
    write_csv(out / "duplicates.csv",
              ["hash", "path", "split", "class", "patient", "group_size", "cross_split", "cross_class"],
              [(h, s.path, s.split, CLASS_NAMES[s.label], s.patient, len(g), _spans(g, "split"), _spans(g, "label"))
               for h, g in groups.items() for s in g])

    overlaps = _patient_overlaps(samples)
    write_csv(out / "patient_overlap.csv", ["patient", "splits", "classes", "images", "images_per_split"], overlaps)

    weight_split = [s.label for s in samples if s.split == sample_split]
    weights = dict(zip(CLASS_NAMES, data.class_weights(weight_split, "balanced")))

    readable = [r for r in stats if not r["error"]]
    summary: dict[str, Any] = {
        "data_root": str(data_root),
        "n_images": len(samples),
        "counts": counts,
        "patients": patients,
        "n_patients": {name: len({s.patient for s in samples if s.label == k}) for k, name in enumerate(CLASS_NAMES)},
        "image_size": _size_stats(readable),
        "modes": dict(Counter(r["mode"] for r in readable).most_common()),
        "n_unreadable": len(stats) - len(readable),
        "n_duplicate_groups": len(groups),
        "n_duplicate_files": sum(len(g) for g in groups.values()),
        "n_within_split_duplicates": sum(not _spans(g, "split") for g in groups.values()),
        "n_cross_split_duplicates": sum(_spans(g, "split") for g in groups.values()),
        "n_cross_class_duplicates": sum(_spans(g, "label") for g in groups.values()),
        "n_patient_overlaps": len(overlaps),
        "class_weights": {"split": sample_split, **weights},
    }
    write_text(out / "summary.md", _markdown(summary))
    log.info(
        "explored %d images: %d duplicate groups (%d across splits), %d patients in more than one split; see %s",
        len(samples), summary["n_duplicate_groups"], summary["n_cross_split_duplicates"],
        summary["n_patient_overlaps"], out / "summary.md",
    )
    return summary


def _counts(samples: Sequence[data.Sample]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Images and distinct patients per split and class, splits in train/val/test order."""
    images: Counter[tuple[str, int]] = Counter()
    people: defaultdict[tuple[str, int], set[str]] = defaultdict(set)
    for s in samples:
        images[s.split, s.label] += 1
        people[s.split, s.label].add(s.patient)
    splits = [split for split in data.SPLITS if any(s.split == split for s in samples)]
    counts = {split: {name: images[split, k] for k, name in enumerate(CLASS_NAMES)} for split in splits}
    patients = {split: {name: len(people[split, k]) for k, name in enumerate(CLASS_NAMES)} for split in splits}
    return counts, patients


def _sample_figure(samples: Sequence[data.Sample], split: str, n: int, seed: int, size: int | None,
                   path: Path) -> None:
    """Seeded random images per class; an unreadable pick is replaced by the next candidate."""
    rng = random.Random(seed)
    images: dict[str, list[np.ndarray]] = {}
    titles: dict[str, list[str]] = {}
    for label, name in enumerate(CLASS_NAMES):
        candidates = [s for s in samples if s.split == split and s.label == label]
        rng.shuffle(candidates)
        images[name], titles[name] = [], []
        for s in candidates:
            if len(images[name]) >= n:
                break
            try:
                images[name].append(imaging.load_image(s.path, size))
            except ImageError as e:
                log.debug("not showing %s: %s", s.path, e.reason)
                continue
            titles[name].append(Path(s.path).stem)
    plots.sample_grid(images, path, titles=titles)


_PROBE_SIZE = 32  # decode size when only readability and the stored size matter


def _image_info(s: data.Sample) -> dict[str, Any]:
    """Size and mode as stored, and whether training could use the file: it is decoded through the
    same policy as training (small, so JPEGs decode at a fraction of their size), since a header
    can look fine in front of truncated data."""
    row: dict[str, Any] = {"path": s.path, "split": s.split, "class": CLASS_NAMES[s.label],
                           "width": "", "height": "", "mode": "", "bytes": "", "error": ""}
    try:
        row["bytes"] = os.stat(s.path).st_size
        picture = imaging.read(s.path, _PROBE_SIZE)
        row["width"], row["height"] = picture.width, picture.height
        row["mode"] = picture.mode
    except OSError as e:
        row["error"] = f"{type(e).__name__}: {e}"
    except ImageError as e:
        row["error"] = e.reason
    return row



def _duplicate_groups(samples: Sequence[data.Sample], sizes: Sequence[int | str]) -> dict[str, list[data.Sample]]:
    """Files with identical bytes, keyed by SHA-256. Only files sharing a size with another file
    can be identical, so only those are hashed; on this dataset that skips most of the reading."""
    by_size: defaultdict[int | str, list[data.Sample]] = defaultdict(list)
    for s, size in zip(samples, sizes):
        if size != "":  # missing file: nothing to hash
            by_size[size].append(s)
    by_hash: defaultdict[str, list[data.Sample]] = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) > 1:
            for s in same_size:
                by_hash[file_sha256(s.path)].append(s)
    return {h: g for h, g in sorted(by_hash.items(), key=lambda kv: kv[1][0].path) if len(g) > 1}


def _spans(group: Sequence[data.Sample], attr: str) -> bool:
    return len({getattr(s, attr) for s in group}) > 1


def _patient_overlaps(samples: Sequence[data.Sample]) -> list[tuple[str, str, str, int, str]]:
    """Patients with images in more than one split: any such split's score is optimistic."""
    by_patient: defaultdict[str, list[data.Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient].append(s)
    rows = []
    for patient, group in sorted(by_patient.items()):
        per_split = Counter(s.split for s in group)
        if len(per_split) < 2:
            continue
        splits = [split for split in data.SPLITS if split in per_split]
        classes = sorted({CLASS_NAMES[s.label] for s in group})
        rows.append((patient, ";".join(splits), ";".join(classes), len(group),
                     ";".join(f"{split}:{per_split[split]}" for split in splits)))
    return rows


def _size_stats(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    stats = {}
    for key in ("width", "height"):
        values = np.array([r[key] for r in rows], dtype=float)
        stats[key] = ({"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}
                      if values.size else {})
    return stats


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _ratio(normal: int, pneumonia: int) -> str:
    return f"{pneumonia / normal:.2f} : 1" if normal else "n/a"


def _markdown(summary: dict[str, Any]) -> str:
    counts, patients = summary["counts"], summary["patients"]
    normal, pneumonia = CLASS_NAMES
    rows = []
    for split, row in counts.items():
        p = patients[split]
        rows.append((split, row[normal], p[normal], row[pneumonia], p[pneumonia], sum(row.values()),
                     _ratio(row[normal], row[pneumonia])))
    total = [sum(counts[s][name] for s in counts) for name in CLASS_NAMES]
    n_patients = summary["n_patients"]
    rows.append(("**all**", total[0], n_patients[normal], total[1], n_patients[pneumonia], sum(total),
                 _ratio(*total)))

    lines = [f"# Dataset summary: `{summary['data_root']}`", "", "## Images per split and class", ""]
    lines += _table(["split", f"{normal} images", f"{normal} patients", f"{pneumonia} images",
                     f"{pneumonia} patients", "total", f"{pneumonia} : {normal}"], rows)

    size = summary["image_size"]
    lines += ["", "## Image files", ""]
    if size["width"]:
        lines += _table(["", "min", "median", "max"],
                        [(k, size[k]["min"], f"{size[k]['median']:g}", size[k]["max"]) for k in ("width", "height")])
        modes = ", ".join(f"{m} {n}" for m, n in summary["modes"].items())
        lines += ["", f"Modes: {modes}."]
    lines.append(f"Unreadable files: {summary['n_unreadable']} (see `image_stats.csv`).")

    lines += [
        "",
        "## Leakage checks",
        "",
        f"- Exact-duplicate groups (identical bytes): {summary['n_duplicate_groups']} "
        f"({summary['n_duplicate_files']} files) — within one split {summary['n_within_split_duplicates']}, "
        f"across splits {summary['n_cross_split_duplicates']}, across classes {summary['n_cross_class_duplicates']} "
        "(see `duplicates.csv`).",
        f"- Patients with images in more than one split: {summary['n_patient_overlaps']} "
        "(see `patient_overlap.csv`).",
        "",
        "## Balanced class weights",
        "",
    ]
    w = summary["class_weights"]
    lines.append(f"On {w['split']}, n / (2 * class count): {normal} {w[normal]:.3f}, {pneumonia} {w[pneumonia]:.3f}.")
    return "\n".join(lines) + "\n"
