"""The CLI as a user runs it: one end-to-end flow, and one readable line for each mistake."""

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pneumoscan.cli import app as cli, train_commands

METRIC_KEYS = {"n", "threshold", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
               "loss", "confusion_matrix", "ci95"}


def run_cli(*args, capsys=None):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(tiny_dataset, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    code, out = run_cli("train", "--data", tiny_dataset, "--backbone-weights", "none", "--epochs", 1,
                        "--image-size", 48, "--batch-size", 8, "--val-fraction", 0.25, "--precision", 32,
                        "--out", tmp_path / "runs", "--name", "e2e", capsys=capsys)
    assert code == 0, out.err
    model = tmp_path / "runs" / "e2e" / "model.pt"
    assert str(model) in out.out
    # the run's log, from its first line (decoding, before the folder existed) to its last
    train_log = (tmp_path / "runs" / "e2e" / "train.log").read_text()
    assert "found 52 images" in train_log and "epoch 1/1: train_loss" in train_log and "test: n=12" in train_log

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
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", "probability", "prediction", "decision", "flags"}

    code, out = run_cli("evaluate", "--model", model, "--data", tiny_dataset, "--out", tmp_path / "eval2",
                        "--threshold", 0.0, "--bootstrap", 50, capsys=capsys)
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["recall"] == 1.0

    code, out = run_cli("predict", "--model", model, tiny_dataset / "test", capsys=capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.out)))
    assert len(rows) == 12 and rows[0].keys() == {"path", "probability", "prediction", "label", "threshold",
                                                  "flags", "flag_details", "model_sha256"}
    # the default UNSURE band (conformal:0.95) needs >= 19 validation films per class; this run has ~5,
    # so its band spans every probability and every film is UNSURE, its prediction still the threshold's class
    from pneumoscan.modeling import artifact

    band = artifact.read_meta(model).unsure
    assert band["low"] == 0.0 and band["high"] == pytest.approx(1.0)
    assert all(r["label"] == "UNSURE" and r["prediction"] in ("0", "1") for r in rows)
    from pneumoscan.core.files import file_sha256

    threshold = json.loads((tmp_path / "runs" / "e2e" / "validation" / "metrics.json").read_text())["threshold"]
    assert {r["model_sha256"] for r in rows} == {file_sha256(model)}
    assert all(float(r["threshold"]) == pytest.approx(threshold, abs=1e-6) for r in rows)

    # one unreadable file among good ones: the rest are still predicted, the bad one named, exit 2
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out = run_cli("predict", "--model", model, tiny_dataset / "test" / "NORMAL", bad,
                        "--out", tmp_path / "p.csv", capsys=capsys)
    assert code == 2 and "bad.jpeg" in out.err
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 6
    # one line for the skipped file, one summary with the right plural
    first, summary = out.err.splitlines()
    assert first.startswith(f"pneumoscan: skipped {bad}: ") and first.count("bad.jpeg") == 1
    assert summary == f"wrote 6 predictions to {tmp_path / 'p.csv'}; skipped 1 unreadable file"


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
    (["train", "--data", "{data}", "--epochs", "0"], "train.epochs: must be >= 1"),
    (["train", "--data", "{data}", "--set", "train.lr=fast"], "train.lr: expected a number"),
    (["train", "--data", "{data}", "--set", "train.nope=1"], "unknown setting 'train.nope'"),
    (["train", "--data", "{data}", "--set", "lr"], "section.field=value"),
    (["train", "--data", "{data}", "--config", "{tmp}/bad.yaml"], "bad.yaml: data.augment: unknown value"),
    (["train", "--set", "train.epochs=2"], "--data is required"),
    (["predict", "{tmp}/note.txt"], "skipped"),
])
def test_user_mistakes_give_one_line_and_exit_2(tiny_dataset, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, data=tiny_dataset) for a in args]
    (tmp_path / "bad.yaml").write_text("data: {augment: mixup}\n")
    (tmp_path / "note.txt").write_text("not an image")
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
    from pneumoscan.core.config import RunConfig
    from pneumoscan.core.recipes import EnsembleConfig, recipe

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--data", "d", "--recipe", "seed-study"])
    seed = train_commands.config_from_args(args)
    assert (seed.model.unfreeze_blocks, seed.data.augment, seed.train.patience) == (0, "seed", 7)
    # no options: the default ensemble, which EnsembleConfig() and recipe("default") also are
    default = train_commands.config_from_args(parser.parse_args(["train", "--data", "d"]))
    assert isinstance(default, EnsembleConfig) and default.data.root == "d"
    assert [m.name for m in default.members] == ["frozen-acquisition-mixup", "seed-study-lite0"]
    assert default.with_settings({"data": {"root": ""}}) == EnsembleConfig() == recipe("default")
    # RunConfig() is the default's first member without its mixup
    import dataclasses
    first = default.members[0]
    assert dataclasses.replace(first.train, mixup=0.0) == RunConfig().train and first.model == RunConfig().model
    # a config file overrides only what it names; flags override the file
    (tmp_path / "c.yaml").write_text("train: {epochs: 3}\n")
    both = train_commands.config_from_args(parser.parse_args(
        ["train", "--data", "d", "--recipe", "seed-study", "--config", str(tmp_path / "c.yaml"), "--patience", "2"]))
    assert (both.train.epochs, both.train.patience, both.model.unfreeze_blocks) == (3, 2, 0)
    every = train_commands.config_from_args(parser.parse_args(
        ["train", "--data", "d", "--config", str(tmp_path / "c.yaml"), "--patience", "2"]))
    assert [(m.train.epochs, m.train.patience) for m in every.members] == [(3, 2), (3, 2)]


def test_set_overrides_after_config_file_and_before_flags(tmp_path):
    parser = cli.build_parser()
    (tmp_path / "c.yaml").write_text("train: {epochs: 3, lr: 0.01}\n")
    config = train_commands.config_from_args(parser.parse_args(
        ["train", "--data", "d", "--config", str(tmp_path / "c.yaml"), "--set", "train.lr=3e-4",
         "--set", "data.augment=seed", "--set", "model.unfreeze_blocks=0", "--set", "train.epochs=5",
         "--epochs", "4"]))
    for member in config.members:  # the default ensemble: what the user set is every member's
        assert (member.train.lr, member.data.augment, member.model.unfreeze_blocks, member.train.epochs) == \
            (3e-4, "seed", 0, 4)
    # data.root may come from --set instead of --data
    assert train_commands.config_from_args(parser.parse_args(["train", "--set", "data.root=x"])).data.root == "x"


def test_flag_choices_come_from_config():
    from pneumoscan.core import config

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.option_strings[0]: a.choices for a in train._actions if a.choices}
    assert choices == {"--augment": config.AUGMENTATIONS, "--class-weights": config.CLASS_WEIGHT_MODES,
                       "--weights-normalization": config.WEIGHTS_NORMALIZATIONS,
                       "--batchnorm": config.BATCHNORM_MODES, "--schedule": config.SCHEDULES,
                       "--precision": config.PRECISIONS}


def help_text(*command):
    result = subprocess.run([sys.executable, "-m", "pneumoscan.cli", *command, "--help"], capture_output=True,
                            text=True, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_shows_one_true_default_each():
    train = help_text("train")
    assert "default: None" not in train and "(default:" not in train
    assert "maximum epochs [30]" in train and "head learning rate [0.001]" in train
    assert "usage: pneumoscan train (--data DIR | --resume RUN_FOLDER)" in train
    assert "required unless --resume" in train
    for command in ("evaluate", "predict", "explain", "export", "serve", "explore", "cv", "compare"):
        text = help_text(command)
        assert "default: None" not in text and "(default:" not in text, command
        assert text.count("[the bundled model]") <= 1
    assert "TCP port to listen on [8000]" in help_text("serve")
    assert "random seed of the sample images shown [0]" in help_text("explore")
    assert "Writes to OUT: summary.md" in help_text("explore")
    assert "one CSV row per image" in help_text("predict")


def test_evaluate_without_model_uses_the_bundled_one(tmp_path, capsys):
    from pneumoscan.modeling import artifact

    if not artifact.BUNDLED_MODEL.is_file():
        pytest.skip("no bundled model in this installation")
    sample = Path(__file__).resolve().parents[1] / "examples" / "chest_xray_sample"
    code, out = run_cli("evaluate", "--data", sample, "--out", tmp_path / "eval", "--report", "--errors", 0,
                        "--bootstrap", 20, capsys=capsys)
    assert code == 0, out.err
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["model"] == str(artifact.BUNDLED_MODEL)
    # the sample images were in the bundled model's training data, and it says so (issue 14)
    if artifact.read_meta(artifact.BUNDLED_MODEL).data_digests:
        n = evaluation["n_images"]
        assert n > 0 and evaluation["n_in_training_data"] == n
        assert f"{n} of {n} evaluated files were in this model's training data" in out.err
        assert "these numbers are optimistic" in (tmp_path / "eval" / "report.html").read_text()
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "evaluate.log").is_file()
