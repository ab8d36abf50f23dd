import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.io import data
from pneumoscan.evaluation.explore import explore

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chest_xray_sample"


def _png(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """train and test with a cross-split duplicate, patient IM-0001 in both splits, one corrupt file."""
    root = tmp_path / "data"
    _png(root / "train/NORMAL/IM-0001-0001.png", 1)
    _png(root / "train/NORMAL/IM-0002-0001.png", 2, size=12)
    _png(root / "train/PNEUMONIA/person1_bacteria_1.png", 3)
    _png(root / "train/PNEUMONIA/person2_virus_2.png", 4)
    _png(root / "test/NORMAL/IM-0001-0002.png", 5)
    _png(root / "test/NORMAL/IM-0003-0001.png", 6)
    (root / "test/PNEUMONIA").mkdir()
    shutil.copyfile(root / "train/PNEUMONIA/person1_bacteria_1.png", root / "test/PNEUMONIA/person3_bacteria_3.png")
    (root / "test/PNEUMONIA/person4_bacteria_4.jpeg").write_bytes(b"not a jpeg")
    return root


def test_explore_writes_everything(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = explore(tree, out, n_samples=2, seed=0)

    expected = ["counts.csv", "class_counts.png", "samples.png", "image_stats.csv", "duplicates.csv",
                "patient_overlap.csv", "summary.md"]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no temporary files left
    for name in ("class_counts.png", "samples.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"

    assert summary["counts"] == {"train": {"NORMAL": 2, "PNEUMONIA": 2}, "test": {"NORMAL": 2, "PNEUMONIA": 2}}
    assert _rows(out / "counts.csv")[0] == {"split": "train", "class": "NORMAL", "images": "2", "patients": "2"}

    stats = {Path(r["path"]).name: r for r in _rows(out / "image_stats.csv")}
    assert len(stats) == 8
    assert stats["IM-0002-0001.png"]["width"] == "12" and stats["IM-0002-0001.png"]["mode"] == "L"
    assert stats["person4_bacteria_4.jpeg"]["error"] and not stats["IM-0001-0001.png"]["error"]
    assert summary["n_unreadable"] == 1

    dups = _rows(out / "duplicates.csv")
    assert {Path(r["path"]).name for r in dups} == {"person1_bacteria_1.png", "person3_bacteria_3.png"}
    assert len({r["hash"] for r in dups}) == 1
    assert all(r["cross_split"] == "True" and r["cross_class"] == "False" for r in dups)
    assert summary["n_duplicate_groups"] == summary["n_cross_split_duplicates"] == 1
    assert summary["n_cross_class_duplicates"] == 0

    overlap = _rows(out / "patient_overlap.csv")
    assert [(r["patient"], r["splits"], r["images"]) for r in overlap] == [("IM-0001", "train;test", "2")]
    assert summary["n_patient_overlaps"] == 1

    assert summary["class_weights"]["NORMAL"] == pytest.approx(1.0)
    md = (out / "summary.md").read_text()
    assert "| split | NORMAL images | NORMAL patients | PNEUMONIA images |" in md
    assert "| train | 2 | 2 | 2 | 2 | 4 | 1.00 : 1 |" in md
    assert "| test | 2 | 2 | 2 | 2 | 4 | 1.00 : 1 |" in md
    assert "Exact-duplicate groups (identical bytes): 1" in md
    assert "more than one split: 1" in md


def test_explore_plain_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(3):
        _png(root / f"NORMAL/IM-000{i}-0001.png", i)
        _png(root / f"PNEUMONIA/person{i}_virus_{i}.png", 10 + i)
    summary = explore(root, tmp_path / "out", n_samples=8, seed=1, image_size=16)
    assert summary["counts"] == {"train": {"NORMAL": 3, "PNEUMONIA": 3}}
    assert summary["n_duplicate_groups"] == summary["n_patient_overlaps"] == 0
    assert (tmp_path / "out/samples.png").stat().st_size > 0


def test_committed_sample() -> None:
    samples = data.scan(SAMPLE)
    assert len(samples) == 200
    counts = {(s.split, s.label): 0 for s in samples}
    for s in samples:
        counts[s.split, s.label] += 1
    assert counts == {("train", 0): 70, ("train", 1): 90, ("test", 0): 15, ("test", 1): 25}
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size <= 3 * 1024 * 1024
    train = {s.patient for s in samples if s.split == "train"}
    test = {s.patient for s in samples if s.split == "test"}
    assert not train & test
    names = [Path(s.path).name for s in samples if s.label == 1]
    assert any("bacteria" in n for n in names) and any("virus" in n for n in names)
    assert (SAMPLE / "README.md").read_text().count("10.17632/rscbjbr9sj.2") >= 1
