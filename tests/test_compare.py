"""`pneumoscan compare`: runs side by side, best validation ROC-AUC first."""

import csv
import json
import math

import pytest

from pneumoscan.modeling import artifact, models
from pneumoscan.cli import app as cli
from pneumoscan.evaluation import compare
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError


@pytest.fixture(scope="module")
def tiny_model():
    return models.build("resnet18", weights="none", head="linear")


def _metrics(auc: float, recall: float = 0.9) -> dict:
    return {"n": 100, "roc_auc": auc, "accuracy": 0.8, "recall": recall, "specificity": 0.7, "f1": 0.8,
            "pr_auc": 0.85, "brier": 0.12, "ece": 0.05,
            "ci95": {"roc_auc": [auc - 0.05, min(auc + 0.03, 1.0)], "accuracy": [0.75, 0.85],
                     "recall": [recall - 0.05, recall + 0.05], "specificity": [0.6, 0.8], "f1": [0.7, 0.9],
                     "pr_auc": [0.8, 0.9]}}


def make_run(root, name, tiny_model, *, val_auc, test_auc=0.9, head="exp1", weights="/w/mobilenet_v2_imagenet.pth",
             model_file=True):
    run = root / name
    (run / "validation").mkdir(parents=True)
    (run / "test").mkdir()
    config = RunConfig()
    config.model.head, config.model.backbone_weights, config.model.unfreeze_blocks = head, weights, 2
    config.data.augment = "seed"
    if model_file:
        model, info = tiny_model
        meta = artifact.make_meta(architecture="resnet18", head=head, image_size=64, weights_info=info,
                                  threshold=0.5, threshold_rule="youden", config=config.to_dict(),
                                  training=artifact.TrainingInfo(epochs_run=12, seconds_per_epoch=3.25))
        artifact.save(run / "model.pt", model, meta)
    if val_auc is not None:
        (run / "validation" / "metrics.json").write_text(json.dumps(_metrics(val_auc)))
    (run / "test" / "metrics.json").write_text(json.dumps(_metrics(test_auc)))
    return run


def test_rows_sorted_by_validation_auc(tmp_path, tiny_model):
    runs = [make_run(tmp_path, "a", tiny_model, val_auc=0.91, head="exp1"),
            make_run(tmp_path, "b", tiny_model, val_auc=0.97, head="exp9", test_auc=0.8),
            make_run(tmp_path, "c", tiny_model, val_auc=float("nan"), head="linear"),
            make_run(tmp_path, "d", tiny_model, val_auc=None, head="exp2"),  # no validation metrics
            make_run(tmp_path, "e", tiny_model, val_auc=0.95, head="exp3", weights="imagenet")]
    rows = compare.collect(runs)
    assert [r["run"] for r in rows][:3] == ["b", "e", "a"]  # by validation, not by test ROC-AUC
    assert {r["run"] for r in rows[3:]} == {"c", "d"}
    best = rows[0]
    assert best["head"] == "exp9" and best["backbone"] == "resnet18" and best["unfreeze_blocks"] == 2
    assert best["weights"] == "mobilenet_v2_imagenet.pth" and rows[1]["weights"] == "imagenet"
    assert best["epochs_run"] == 12 and best["seconds_per_epoch"] == 3.25 and best["augment"] == "seed"
    assert best["validation_roc_auc_lo"] == pytest.approx(0.92) and best["test_roc_auc"] == 0.8
    assert best["test_ece"] == 0.05


def test_markdown_csv_and_cli(tmp_path, tiny_model, capsys):
    root = tmp_path / "runs"
    make_run(root, "low", tiny_model, val_auc=0.80)
    make_run(root, "high", tiny_model, val_auc=0.99)
    make_run(root, "crashed", tiny_model, val_auc=0.99, model_file=False)  # no model.pt: skipped

    code = cli.main(["compare", str(root), "--out", str(tmp_path / "cmp")])  # a folder of runs
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "val ROC-AUC" in table[0]
    assert table[2].startswith("| 1 | high |") and table[3].startswith("| 2 | low |")
    assert "0.990 (0.940–1.000)" in table[2] and "12" in table[2] and "3.25" in table[2]
    assert code == 0 and "crashed" not in out
    assert (tmp_path / "cmp" / "compare.md").read_text() == out
    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["high", "low"]
    assert float(rows[0]["validation_roc_auc_hi"]) == 1.0 and rows[0]["test_specificity_lo"] == "0.6"


def test_nothing_to_compare_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folders"):
        compare.collect([tmp_path / "empty"])
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_missing_values_render_as_dashes():
    row = {"run": "r", "validation_roc_auc": math.nan}
    text = compare.markdown([row])
    assert "| 1 | r |" in text and "–" in text


def test_an_ensemble_lists_its_members_recipes(tmp_path):
    nets, members = [], []
    for augment, weights in (("acquisition", "/w/mobilenet_v2_imagenet.pth"), ("seed", "imagenet")):
        net, info = models.build("resnet18", weights="none", head="linear")
        normalization = artifact.make_meta(architecture="resnet18", head="linear", image_size=64, weights_info=info,
                                           threshold=0.5, threshold_rule="youden", config={}).normalization
        config = RunConfig()
        config.data.augment, config.model.backbone_weights = augment, weights
        nets.append(net)
        members.append(artifact.Member("resnet18", "linear", normalization, config=config.to_dict()))
    run = tmp_path / "ens"
    (run / "validation").mkdir(parents=True)
    no_interval = _metrics(0.9) | {"ci95": {"roc_auc": [1.0, math.nan]}}
    (run / "validation" / "metrics.json").write_text(json.dumps(no_interval))
    meta = artifact.ModelMeta(architecture=artifact.ENSEMBLE, head="mean-logit", image_size=64,
                              normalization=artifact.PER_MEMBER, threshold=0.5, threshold_rule="youden",
                              members=tuple(members))
    artifact.save(run / "model.pt", models.Ensemble(nets, ["resnet18", "resnet18"]), meta)
    row = compare.collect([run])[0]
    assert row["backbone"] == "resnet18+resnet18" and row["augment"] == "acquisition+seed"
    assert row["weights"] == "mobilenet_v2_imagenet.pth+imagenet" and row["unfreeze_blocks"] == "0+0"
    assert "| 0.900 |" in compare.markdown([row])  # an interval that could not be computed is not shown
