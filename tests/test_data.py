"""Data layer tests on tiny synthetic trees and images (all made in tmp_path; a few seconds total)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan import CLASS_NAMES
from pneumoscan.io.data import (
    ImageDataset,
    Sample,
    assign_validation,
    class_weights,
    grouped_folds,
    holdout_split,
    load_images,
    patient_id,
    read_manifest,
    scan,
    write_manifest,
    write_skipped,
)
from pneumoscan.core.errors import ImageError, UserError

rng = np.random.default_rng(0)


def _jpeg(path: Path, size=(16, 16), value: int | None = None) -> Path:
    a = np.full(size[::-1], value, np.uint8) if value is not None else rng.integers(0, 256, size[::-1], np.uint8)
    Image.fromarray(a).save(path, quality=90)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def make_tree(
    root: Path,
    *,
    normal: int = 12,
    pneumonia: int = 20,
    per_patient: int = 2,
    val: int = 2,
    test: int = 2,
    names: dict[str, str] | None = None,
) -> Path:
    """A Kaggle-like tree: IM-/NORMAL2-IM- names for NORMAL, personN_bacteria/virus for PNEUMONIA.

    ``names`` renames folders (e.g. {"train": "TRAIN", "NORMAL": "Normal"}) to test case-insensitivity.
    """
    names = names or {}
    n = lambda s: names.get(s, s)  # noqa: E731
    pid = iter(range(1, 10_000))

    def fill(split: str, n_normal: int, n_pneu: int, k: int) -> None:
        nd, pd = root / n(split) / n("NORMAL"), root / n(split) / n("PNEUMONIA")
        nd.mkdir(parents=True)
        pd.mkdir(parents=True)
        for i in range(n_normal):
            p = next(pid)
            prefix = "NORMAL2-IM" if i % 3 == 0 else "IM"
            for j in range(k):
                _jpeg(nd / f"{prefix}-{p:04d}-{j + 1:04d}.jpeg")
        for _ in range(n_pneu):
            p = next(pid)
            for j in range(k):
                kind = "bacteria" if j % 2 == 0 else "virus"
                _jpeg(pd / f"person{p}_{kind}_{next(pid)}.jpeg")

    fill("train", normal, pneumonia, per_patient)
    if val:
        fill("val", val, val, 1)
    if test:
        fill("test", test, test, 1)
    return root


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("kaggle"))


# ----------------------------------------------------------------------------- patient_id


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("/data/train/PNEUMONIA/person7_bacteria_29.jpeg", "person7"),
        ("PERSON12_Virus_3.JPEG", "person12"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("im-0115-0002.jpg", "IM-0115"),
        ("NORMAL2-IM-0135-0001.jpeg", "IM-0135"),
        ("normal2-im-0135-0002.png", "IM-0135"),
        ("scan_042.png", "scan_042"),
        ("personal_photo.jpg", "personal_photo"),
        ("IMG-0001.png", "IMG-0001"),
    ],
)
def test_patient_id(name, expected):
    assert patient_id(name) == expected


# ----------------------------------------------------------------------------- scan


def test_scan_split_layout(kaggle):
    samples = scan(kaggle)
    c = Counter((s.split, s.label) for s in samples)
    assert c == {("train", 0): 24, ("train", 1): 40, ("val", 0): 2, ("val", 1): 2, ("test", 0): 2, ("test", 1): 2}
    assert samples == scan(kaggle)  # deterministic
    assert [s.split for s in samples] == sorted((s.split for s in samples), key=["train", "val", "test"].index)
    for s in samples:
        assert Path(s.path).parent.name == CLASS_NAMES[s.label]
        assert s.patient == patient_id(s.path)
        assert Path(s.path).is_absolute()


def test_scan_keeps_relative_paths(kaggle, monkeypatch):
    monkeypatch.chdir(kaggle.parent)
    samples = scan(kaggle.name)
    assert all(s.path.startswith(kaggle.name) and Path(s.path).exists() for s in samples)


def test_scan_class_layout_and_file_filtering(tmp_path, caplog):
    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / name).mkdir()
    _jpeg(tmp_path / "NORMAL" / "IM-0001-0001.jpeg")
    _jpeg(tmp_path / "NORMAL" / "IM-0002-0001.JPG")
    Image.new("L", (8, 8)).save(tmp_path / "PNEUMONIA" / "person1_virus_1.PNG")
    (tmp_path / "NORMAL" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "NORMAL" / "._IM-0001-0001.jpeg").write_bytes(b"junk")
    (tmp_path / "NORMAL" / "notes.txt").write_text("hi")
    (tmp_path / "NORMAL" / "sub").mkdir()

    with caplog.at_level(logging.WARNING, logger="pneumoscan.io.data"):
        samples = scan(tmp_path, default_split="test")
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "left out 2 entries" in line and "sub/ (a folder)" in line and "notes.txt" in line
    assert ".DS_Store" not in line  # hidden files are not news
    assert [(Path(s.path).name, s.label, s.split) for s in samples] == [
        ("IM-0001-0001.jpeg", 0, "test"),
        ("IM-0002-0001.JPG", 0, "test"),
        ("person1_virus_1.PNG", 1, "test"),
    ]


def test_scan_case_insensitive_folders(tmp_path):
    names = {"train": "TRAIN", "test": "Test", "NORMAL": "Normal", "PNEUMONIA": "pneumonia"}
    make_tree(tmp_path, normal=2, pneumonia=2, val=0, names=names)
    counts = Counter((s.split, s.label) for s in scan(tmp_path))
    assert counts == {("train", 0): 4, ("train", 1): 4, ("test", 0): 2, ("test", 1): 2}


def test_scan_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*nope"):
        scan(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory.*file.txt"):
        scan(tmp_path / "file.txt")
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="expected split folders train/ val/ test/.*NORMAL/ and PNEUMONIA/") as e:
        scan(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_scan_missing_and_empty_class(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    _jpeg(tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(UserError, match="missing class folder") as e:
        scan(tmp_path)
    assert str(tmp_path / "train" / "PNEUMONIA") in str(e.value)

    (tmp_path / "train" / "PNEUMONIA").mkdir()
    (tmp_path / "train" / "PNEUMONIA" / ".DS_Store").write_bytes(b"")
    (tmp_path / "train" / "PNEUMONIA" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=f"no images in {tmp_path / 'train' / 'PNEUMONIA'}"):
        scan(tmp_path)


# ----------------------------------------------------------------------------- splits


def _patients(samples, split):
    return {s.patient for s in samples if s.split == split}


def test_assign_validation_grouped_stratified_seeded(kaggle):
    samples = scan(kaggle)
    out = assign_validation(samples, val_fraction=0.1, min_val_images=100, seed=0)
    assert [(s.path, s.label, s.patient) for s in out] == [(s.path, s.label, s.patient) for s in samples]
    assert _patients(out, "train").isdisjoint(_patients(out, "val"))
    val = [s for s in out if s.split == "val"]
    assert {s.label for s in val} == {0, 1}
    pool = sum(s.split in ("train", "val") for s in samples)  # dataset's val merged into train first
    assert 0.05 <= len(val) / pool <= 0.2
    assert [s for s, o in zip(samples, out) if s.split == "test"] == [o for o in out if o.split == "test"]
    assert out == assign_validation(samples, val_fraction=0.1, min_val_images=100, seed=0)
    others = [assign_validation(samples, seed=s) for s in (1, 2, 3)]
    assert any(o != out for o in others)


def test_assign_validation_keeps_large_val(kaggle):
    samples = scan(kaggle)
    assert assign_validation(samples, min_val_images=4) == samples


def test_assign_validation_too_few_patients(tmp_path):
    make_tree(tmp_path, normal=3, pneumonia=3, val=0, test=0)
    with pytest.raises(UserError, match="only 3 NORMAL patients"):
        assign_validation(scan(tmp_path), val_fraction=0.1)


def test_holdout_split(kaggle):
    samples = [s for s in scan(kaggle) if s.split == "train"]
    out = holdout_split(samples, 0.25, seed=1)
    assert _patients(out, "train").isdisjoint(_patients(out, "test"))
    test = [s for s in out if s.split == "test"]
    assert {s.label for s in test} == {0, 1}
    assert 0.15 <= len(test) / len(samples) <= 0.35
    assert out == holdout_split(samples, 0.25, seed=1)
    val = holdout_split(samples, 0.25, seed=1, split_name="val")
    assert [s.split for s in val] == [("val" if s.split == "test" else s.split) for s in out]
    with pytest.raises(UserError):
        holdout_split(samples, 1.5, seed=1)


def test_grouped_folds(kaggle):
    samples = [s for s in scan(kaggle) if s.split == "train"]
    folds = grouped_folds(samples, k=4, seed=0)
    assert len(folds) == 4
    held = sorted(i for _, te in folds for i in te)
    assert held == list(range(len(samples)))  # every sample held out exactly once
    for tr, te in folds:
        assert sorted(tr + te) == list(range(len(samples)))
        assert {samples[i].patient for i in tr}.isdisjoint({samples[i].patient for i in te})
        assert {samples[i].label for i in te} == {0, 1}
    assert folds == grouped_folds(samples, k=4, seed=0)


# ----------------------------------------------------------------------------- load_images


def _samples(paths_labels):
    return [Sample(str(p), y, patient_id(p), "train") for p, y in paths_labels]


def test_load_images_skips_unreadable(tmp_path, caplog):
    good = [(_jpeg(tmp_path / f"IM-{i:04d}-0001.jpeg", value=10 * i), 0) for i in range(3)]
    good += [(_jpeg(tmp_path / f"person{i}_virus_1.jpeg", value=100 + i), 1) for i in range(3)]
    bad = [(tmp_path / "gone.jpeg", 0), (_truncated_jpeg(tmp_path / "person9_bacteria_1.jpeg"), 1)]
    samples = _samples([good[0], bad[0], *good[1:4], bad[1], *good[4:]])
    calls = []
    with caplog.at_level(logging.WARNING, logger="pneumoscan.io.data"):
        kept, images, skipped = load_images(samples, 16, progress=calls.append)
    assert calls == list(range(1, len(samples) + 1))
    assert [s.path for s in kept] == [str(p) for p, _ in good]  # order kept
    assert images.shape == (6, 16, 16) and images.dtype == np.uint8
    # rows follow the kept samples
    assert [int(im.mean()) for im in images] == [0, 10, 20, 100, 101, 102]
    assert [p for p, _ in skipped] == [str(bad[0][0]), str(bad[1][0])]
    assert "not found" in skipped[0][1] and "truncated" in skipped[1][1]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("skipped 2 unreadable files: ") and str(bad[0][0]) in line

    with pytest.raises(ImageError, match="gone.jpeg"):
        load_images(samples, 16, strict=True)


def test_load_images_truncates_long_list(tmp_path, caplog):
    good = [(_jpeg(tmp_path / "IM-0001-0001.jpeg"), 0), (_jpeg(tmp_path / "person1_virus_1.jpeg"), 1)]
    bad = [(tmp_path / f"missing{i:02d}.png", 1) for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="pneumoscan.io.data"):
        kept, images, skipped = load_images(_samples(good + bad), 8)
    assert len(kept) == 2 and len(skipped) == 12
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 12 unreadable files" in line and line.endswith(", ...")
    assert "missing09.png" in line and "missing10.png" not in line


def test_load_images_class_with_no_readable_images(tmp_path):
    samples = _samples([(_jpeg(tmp_path / "IM-0001-0001.jpeg"), 0), (tmp_path / "person1_virus_1.jpeg", 1)])
    with pytest.raises(UserError, match="PNEUMONIA"):
        load_images(samples, 8)


# ----------------------------------------------------------------------------- dataset, weights, manifests


def test_image_dataset():
    images = rng.integers(0, 256, (5, 12, 10), np.uint8)
    images[0] = 255
    images[1] = 0
    seen = []

    def transform(x):
        seen.append((x.dtype, tuple(x.shape)))
        return x.flip(-1)

    ds = ImageDataset(images, [0, 1, 1, 0, 1], transform=transform)
    assert len(ds) == 5
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 12, 10) and y.dtype == torch.float32 and y.shape == ()
    assert x.min() == 1.0 and ds[1][0].max() == 0.0 and ds[1][1] == 1.0
    assert seen[0] == (torch.uint8, (1, 12, 10))
    assert torch.equal(ds[2][0], torch.from_numpy(images[2][None, :, ::-1].copy()).float() / 255)
    for i in range(5):
        assert 0.0 <= ds[i][0].min() and ds[i][0].max() <= 1.0

    plain = ImageDataset(images, np.array([0, 1, 1, 0, 1]))
    images[3] = 7  # shares memory with the array: no copy was made
    assert torch.allclose(plain[3][0], torch.full((1, 12, 10), 7 / 255))
    assert ImageDataset(torch.from_numpy(images), torch.tensor([0, 1, 1, 0, 1]))[4][1] == 1.0


def test_class_weights():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 1341 + [1] * 3875)
    w = class_weights(labels)
    assert tuple(round(v, 4) for v in w) == (1.9448, 0.6730)
    assert np.allclose(w, compute_class_weight("balanced", classes=np.array([0, 1]), y=labels))
    small = [0, 1, 1, 1, 1, 0, 1]
    assert np.allclose(class_weights(small), compute_class_weight("balanced", classes=np.array([0, 1]), y=small))
    assert class_weights(labels, "none") == (1.0, 1.0)
    with pytest.raises(UserError, match="balanced, none"):
        class_weights(labels, "inverse")
    with pytest.raises(UserError, match="NORMAL"):
        class_weights([1, 1, 1])


def test_manifest_round_trip(tmp_path, kaggle):
    samples = assign_validation(scan(kaggle), seed=3)
    samples.append(Sample("odd, name \"quoted\".png", 0, "odd, name", "test"))
    path = tmp_path / "run" / "manifest.csv"
    write_manifest(samples, path)
    assert read_manifest(path) == samples
    assert path.read_text().splitlines()[0] == "path,label,class_name,patient,split"
    assert [p.name for p in path.parent.iterdir()] == ["manifest.csv"]  # no temp file left behind

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace(",NORMAL,", ",PNEUMONIA,")]) + "\n")
    with pytest.raises(UserError, match="line 2"):
        read_manifest(path)
    with pytest.raises(UserError, match="missing.csv"):
        read_manifest(tmp_path / "missing.csv")


def test_write_skipped(tmp_path):
    path = tmp_path / "skipped.csv"
    write_skipped([("a.jpeg", "file not found"), ("b.png", "corrupt, really")], path)
    assert path.read_text().splitlines() == ["path,reason", "a.jpeg,file not found", 'b.png,"corrupt, really"']
