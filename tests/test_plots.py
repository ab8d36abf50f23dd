import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.evaluation import plots


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 50)
    prob = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, y.size), 0, 1)
    return y, prob


def test_confusion_matrix(tmp_path: Path) -> None:
    path = plots.confusion_matrix_plot([[25, 5], [3, 47]], tmp_path / "cm.png", title="Test")
    assert path == tmp_path / "cm.png"
    _assert_png(path)


def test_confusion_matrix_empty_row(tmp_path: Path) -> None:
    _assert_png(plots.confusion_matrix_plot([[0, 0], [3, 47]], tmp_path / "cm.png"))


@pytest.mark.parametrize("fn", [plots.roc_plot, plots.pr_plot, plots.probability_histogram])
def test_score_plots(fn, scores, tmp_path: Path) -> None:
    y, prob = scores
    _assert_png(fn(y, prob, tmp_path / "a.png"))
    _assert_png(fn(y, prob, tmp_path / "b.png", threshold=0.5))


@pytest.mark.parametrize("fn", [plots.roc_plot, plots.pr_plot])
def test_curves_with_one_class_do_not_crash(fn, tmp_path: Path) -> None:
    _assert_png(fn([1, 1, 1], [0.2, 0.7, 0.9], tmp_path / "one.png", threshold=0.5))


def test_reliability_diagram(scores, tmp_path: Path) -> None:
    y, prob = scores
    _assert_png(plots.reliability_diagram(y, prob, tmp_path / "rel.png", n_bins=10))


def test_training_curves_csv_with_nan_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,step,train_loss,val_loss,train_accuracy,val_accuracy,lr\n"
        "0,10,,0.69,,0.55,0.001\n"  # validation-only row
        "0,10,0.70,,0.52,,0.001\n"  # train-only row
        "1,20,0.50,nan,0.75,nan,0.001\n"
        "1,20,,0.45,,0.80,0.001\n"
    )
    _assert_png(plots.training_curves(csv_path, tmp_path / "curves.png"))


def test_training_curves_rows(tmp_path: Path) -> None:
    rows = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": math.nan if e == 1 else 1.2 / (e + 1),
         "train_accuracy": 0.5 + e / 10, "val_accuracy": 0.5 + e / 12}
        for e in range(4)
    ]
    rows.append({"epoch": 4, "val_loss": 0.3})  # missing keys are fine
    _assert_png(plots.training_curves(rows, tmp_path / "curves.png"))
    _assert_png(plots.training_curves([], tmp_path / "empty.png"))


def test_per_epoch_keeps_last_value_and_drops_nan() -> None:
    epochs, values = plots._per_epoch(np.array([0, 0, 1, 2.0]), np.array([1.0, 2.0, np.nan, 3.0]))
    assert epochs.tolist() == [0, 2] and values.tolist() == [2.0, 3.0]


def test_class_counts_bar(tmp_path: Path) -> None:
    counts = {"train": {"NORMAL": 70, "PNEUMONIA": 90}, "test": {"NORMAL": 15, "PNEUMONIA": 25}}
    _assert_png(plots.class_counts_bar(counts, tmp_path / "counts.png"))
    _assert_png(plots.class_counts_bar({"train": {"PNEUMONIA": 3}}, tmp_path / "one.png"))


def test_sample_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {
        "NORMAL": [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(3)],
        "PNEUMONIA": [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2)],
    }
    titles = {"NORMAL": ["a", "b", "c"], "PNEUMONIA": ["d", "e"]}
    _assert_png(plots.sample_grid(images, tmp_path / "grid.png", titles=titles))
    _assert_png(plots.sample_grid({"NORMAL": images["NORMAL"][:1]}, tmp_path / "single.png"))


def test_save_figure_creates_parent_and_replaces(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    target = tmp_path / "sub" / "fig.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    plots.save_figure(fig, target)
    _assert_png(target)
