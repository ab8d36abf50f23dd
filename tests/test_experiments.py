"""Experiment grids: every variant × seed trained, tracked in MLflow, and compared as mean ± sd."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from conftest import make_dataset
from pneumoscan.cli import app as cli
from pneumoscan.training import experiments
from pneumoscan.core.errors import UserError

pytestmark = pytest.mark.slow  # most tests here train models (minutes on two cores)

# resnet18: a random-init frozen MobileNetV2 gives all-zero features, so every head would tie
GRID = {
    "base": {"data": {"image_size": 32, "min_val_images": 1, "batch_size": 8, "augment": "none"},
             "model": {"backbone": "resnet18", "backbone_weights": "none", "unfreeze_blocks": 0},
             "train": {"epochs": 1, "precision": "32", "lr": 3e-3}},
    "seeds": [7, 8],
    "runs": [{"name": "linear", "model": {"head": "linear"}},
             {"name": "mlp", "model": {"head": "64,32"}, "train": {"lr": 1e-2}}],
}


def write_grid(tmp_path, grid=GRID):
    path = tmp_path / "tiny_grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_runs_every_seed_tracks_them_and_compares_mean_sd(tmp_path, capsys, caplog, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_dataset = make_dataset(tmp_path / "data", {"train": (8, 8), "val": (4, 4), "test": (4, 4)}, size=32)
    out = tmp_path / "exp"
    with caplog.at_level("INFO", logger="pneumoscan.training.features"):
        code = cli.main(["experiments", "--grid", str(write_grid(tmp_path)), "--data", str(tiny_dataset),
                         "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # the second variant of each seed reused the first one's features from the shared cache
    assert "from cache" in caplog.text

    runs = {f"{v}-s{s}": out / f"{v}-s{s}" for v in ("linear", "mlp") for s in (7, 8)}
    for name, run in runs.items():
        assert (run / "model.pt").is_file(), name
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["train"]["seed"] == int(name[-1]) and config["train"]["cache_dir"] == str(out / ".feature-cache")
    assert yaml.safe_load((runs["mlp-s8"] / "config.yaml").read_text())["train"]["lr"] == 1e-2  # override applied

    def value(run, split, key):
        return json.loads((run / split / "metrics.json").read_text())[key]

    with open(out / "comparison.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == sorted(
        ["linear", "mlp"], key=lambda v: -statistics.mean(value(runs[f"{v}-s{s}"], "validation", "roc_auc") for s in (7, 8)))
    for row in table:
        assert row["n"] == "2" and row["seeds"] == "7 8"
        for split, key in (("validation", "roc_auc"), ("validation", "specificity"), ("test", "f1"), ("test", "recall")):
            per_seed = [value(runs[f"{row['run']}-s{s}"], split, key) for s in (7, 8)]
            assert float(row[f"{split}_{key}_mean"]) == pytest.approx(statistics.mean(per_seed))
            assert float(row[f"{split}_{key}_sd"]) == pytest.approx(statistics.stdev(per_seed))
        assert float(row["seconds_per_epoch_mean"]) > 0 and row["feature_seconds_mean"] != ""
    markdown = (out / "comparison.md").read_text()
    assert markdown in printed.out
    assert "| 1 | " + table[0]["run"] + " | " in markdown and "±" in markdown and "test ROC-AUC" in markdown

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny_grid")
    tracked = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in tracked) == sorted(runs)
    for r in tracked:
        run = runs[r.info.run_name]
        assert r.data.params["model.head"] == yaml.safe_load((run / "config.yaml").read_text())["model"]["head"]
        assert r.data.params["train.seed"] == r.info.run_name[-1] and r.data.tags["variant"] in ("linear", "mlp")
        assert r.data.metrics["validation/roc_auc"] == pytest.approx(value(run, "validation", "roc_auc"))
        assert r.data.metrics["test/accuracy"] == pytest.approx(value(run, "test", "accuracy"))
        assert "train_loss" in r.data.metrics and "val_loss" in r.data.metrics  # epoch curves via MLFlowLogger
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "curves.png", "validation", "test"} <= files and "model.pt" not in files
    assert (out / "mlartifacts").is_dir()  # artifacts beside the local database, not in ./mlruns


@pytest.mark.parametrize("change, message", [
    ({"runs": [{"name": "a", "model": {"haed": "linear"}}]}, "unknown ModelConfig keys"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "unique 'name'"),
    ({"runs": [{"name": "a", "model": {"head": "64,zz"}}]}, "run a: bad head spec"),
    ({"runs": [{"name": "a", "train": {"devices": 2}}]}, "one process per run"),
    ({"runs": [{"name": "a", "train": {"members": "seed-study,frozen-acquisition"}}]}, "run a: train.members"),
    ({"extra": 1}, "top-level keys"),
    ({"seeds": "7"}, "list of integers"),
])
def test_grid_mistakes_are_caught_before_any_training(tiny_dataset, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        experiments.plan(write_grid(tmp_path, GRID | change), data_root=str(tiny_dataset))


def test_seeds_option_and_out_folder(tiny_dataset, tmp_path):
    out, runs = experiments.plan(write_grid(tmp_path), seeds=3, data_root=str(tiny_dataset))
    assert out.name == "tiny_grid"
    assert [r.name for r in runs] == ["linear-s7", "mlp-s7", "linear-s8", "mlp-s8", "linear-s9", "mlp-s9"]


def test_missing_mlflow_says_how_to_install(tiny_dataset, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(UserError, match=r"pip install 'pneumoscan\[tracking\]'"):
        experiments.run_grid(write_grid(tmp_path), data_root=str(tiny_dataset), out_dir=tmp_path / "o")
