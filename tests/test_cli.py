"""The CLI as a user runs it: one end-to-end flow, and one readable line for each mistake."""

import csv
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from pneumoscan import cli

METRIC_KEYS = {"n", "threshold", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
               "loss", "confusion_matrix", "ci95"}


def run_cli(*args, capsys=None):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_train_evaluate_predict_end_to_end(tiny_dataset, tmp_path, capsys):
    code, out = run_cli("train", "--data", tiny_dataset, "--backbone-weights", "none", "--epochs", 1,
                        "--image-size", 48, "--batch-size", 8, "--val-fraction", 0.25, "--precision", 32,
                        "--out", tmp_path / "runs", "--name", "e2e", capsys=capsys)
    assert code == 0, out.err
    model = tmp_path / "runs" / "e2e" / "model.pt"
    assert str(model) in out.out

    code, out = run_cli("evaluate", "--model", model, "--data", tiny_dataset, "--out", tmp_path / "eval",
                        "--bootstrap", 200, capsys=capsys)
    assert code == 0, out.err
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(result) >= METRIC_KEYS and result["n"] == 12
    assert set(result["ci95"]) >= {"accuracy", "roc_auc", "recall", "specificity"}
    for png in ("confusion_matrix.png", "roc.png", "pr.png", "probability_histogram.png"):
        assert (tmp_path / "eval" / png).is_file()
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", "probability", "prediction"}

    code, out = run_cli("evaluate", "--model", model, "--data", tiny_dataset, "--out", tmp_path / "eval2",
                        "--threshold", 0.0, "--bootstrap", 50, capsys=capsys)
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["recall"] == 1.0

    code, out = run_cli("predict", "--model", model, tiny_dataset / "test", capsys=capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.out)))
    assert len(rows) == 12 and rows[0].keys() == {"path", "probability", "prediction", "label", "threshold",
                                                  "model_sha256"}
    assert all(r["label"] in ("NORMAL", "PNEUMONIA") for r in rows)

    # one unreadable file among good ones: the rest are still predicted, the bad one named, exit 2
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out = run_cli("predict", "--model", model, tiny_dataset / "test" / "NORMAL", bad,
                        "--out", tmp_path / "p.csv", capsys=capsys)
    assert code == 2 and "bad.jpeg" in out.err
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 6


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "{tmp}/nowhere", "--backbone-weights", "none"], "nowhere"),
    (["train", "--data", "{data}", "--backbone", "vgg99", "--backbone-weights", "none"], "valid: mobilenet_v2"),
    (["train", "--data", "{data}", "--backbone-weights", "{tmp}/missing.pth"], "missing.pth"),
    (["train", "--data", "{data}", "--backbone-weights", "none", "--threshold", "median"], "threshold"),
    (["evaluate", "--model", "{tmp}/none.pt", "--data", "{data}", "--out", "{tmp}/o"], "none.pt"),
    (["predict", "--model", "{tmp}/none.pt", "{tmp}"], "none.pt"),
    (["train", "--resume", "{tmp}"], "cannot resume"),
    (["train", "--data", "{data}", "--recipe", "best-ever"], "valid: default, seed-study"),
    (["train", "--data", "{data}", "--backbone-weights", "none", "--unfreeze-at", "soon"], "EPOCH:STAGES"),
])
def test_user_mistakes_give_one_line_and_exit_2(tiny_dataset, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, data=tiny_dataset) for a in args]
    code, out = run_cli(*args, capsys=capsys)
    assert code == 2
    assert message in out.err
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1


def test_empty_class_folder_is_named(tmp_path, capsys):
    (tmp_path / "d" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "d" / "train" / "PNEUMONIA").mkdir(parents=True)
    Image.new("L", (20, 20)).save(tmp_path / "d" / "train" / "PNEUMONIA" / "person1_virus_1.png")
    code, out = run_cli("train", "--data", tmp_path / "d", "--backbone-weights", "none", capsys=capsys)
    assert code == 2 and "NORMAL" in out.err and "Traceback" not in out.err


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("explore", "train", "evaluate", "predict"):
        assert command in result.stdout


def test_recipe_then_config_file_then_flags(tmp_path):
    from pneumoscan.config import RunConfig

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--data", "d", "--recipe", "seed-study"])
    seed = cli.config_from_args(args)
    assert (seed.model.unfreeze_blocks, seed.data.augment, seed.train.patience) == (0, "seed", 7)
    default = cli.config_from_args(parser.parse_args(["train", "--data", "d"]))
    assert default.model.unfreeze_blocks == -1 and default.data.augment == "radiograph"
    assert default == RunConfig(data=default.data)  # the package defaults are the default recipe
    # a config file overrides only what it names; flags override the file
    (tmp_path / "c.yaml").write_text("train: {epochs: 3}\n")
    both = cli.config_from_args(parser.parse_args(
        ["train", "--data", "d", "--recipe", "seed-study", "--config", str(tmp_path / "c.yaml"), "--patience", "2"]))
    assert (both.train.epochs, both.train.patience, both.model.unfreeze_blocks) == (3, 2, 0)
