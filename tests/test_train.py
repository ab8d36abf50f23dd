import csv
import json

import lightning as L
import pytest
import torch
import yaml

from pneumoscan.modeling import artifact
from pneumoscan.io import data
from pneumoscan.training import finetune, litmodule, train
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError

pytestmark = pytest.mark.slow  # most tests here train models (minutes on two cores)


def tiny_config(root, out, **train_kw) -> RunConfig:
    config = RunConfig()
    config.data.root = str(root)
    config.data.image_size = 48
    config.data.val_fraction = 0.25
    config.data.batch_size = 8
    config.model.backbone_weights = "none"
    config.model.unfreeze_blocks = 0  # frozen unless a test says otherwise: the fast path, seconds
    config.train.precision = "32"
    config.train.epochs = 1
    config.out_dir = str(out)
    config.name = "run"
    for k, v in train_kw.items():
        setattr(config.train, k, v)
    return config


def test_fit_writes_a_self_describing_run_folder(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs"))
    for name in ("config.yaml", "manifest.csv", "skipped.csv", "history.csv", "curves.png", "model.pt",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "validation/metrics.json", "test/metrics.json"):
        assert (run / name).is_file(), name
    # the manifest holds every file once, and no patient is in two splits
    samples = data.read_manifest(run / "manifest.csv")
    assert len(samples) == 52
    splits_of = {}
    for s in samples:
        splits_of.setdefault(s.patient, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of.values())
    assert {s.split for s in samples} == {"train", "val", "test"}
    # the config round-trips
    assert RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())).data.root == str(tiny_dataset)
    _, meta = artifact.load(run / "model.pt")
    assert meta.threshold_rule == "youden"  # the default rule, fitted on validation
    assert 0 <= meta.threshold <= 1
    assert meta.temperature > 0 and meta.training.epochs_run == 1
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    for col in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_precision", "val_recall", "val_auc"):
        assert row[col] != "", col
    test = json.loads((run / "test" / "metrics.json").read_text())
    assert test["n"] == 12 and test["threshold"] == pytest.approx(meta.threshold)


def test_training_learns_the_synthetic_signal(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=6, lr=3e-3, threshold="0.5")
    config.model.backbone = "resnet18"
    config.model.unfreeze_blocks = -1
    config.data.augment = "none"
    config.train.backbone_lr = 3e-3
    run = train.fit(config)
    val = json.loads((run / "validation" / "metrics.json").read_text())
    assert val["roc_auc"] > 0.8


def test_resume_continues_from_last_checkpoint(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = train.fit(RunConfig(), resume_dir=run)
    assert resumed == run
    _, meta = artifact.load(run / "model.pt")
    assert meta.training.epochs_run == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] >= 1
    with open(run / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # the first session's epoch is kept


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot resume"):
        train.fit(RunConfig(), resume_dir=tmp_path)


def test_threshold_rule_comes_from_validation(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs", threshold="sensitivity:0.95"))
    _, meta = artifact.load(run / "model.pt")
    val = json.loads((run / "validation" / "metrics.json").read_text())
    assert val["recall"] >= 0.95 and meta.threshold_rule == "sensitivity:0.95"


def test_fast_path_caches_features_and_matches_slow_path_shape(tiny_dataset, tmp_path, caplog):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=2)
    config.train.views = 2
    fast = train.fit(config)
    assert list((tmp_path / "runs" / ".feature-cache").glob("features-*.pt"))
    config.name = "again"
    with caplog.at_level("INFO", logger="pneumoscan.training.features"):
        train.fit(config)
    assert "from cache" in caplog.text
    config.name, config.train.feature_cache = "slow", False
    slow = train.fit(config)
    for run in (fast, slow):
        assert json.loads((run / "validation" / "metrics.json").read_text())["n"] > 0
        _, meta = artifact.load(run / "model.pt")
        assert meta.training.epochs_run == 2


def test_progressive_unfreezing_adds_stages_to_the_optimizer_on_schedule(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=3, unfreeze_at="1:2,2:-1", patience=10)
    config.model.backbone = "resnet18"
    config.data.augment = "none"
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            groups = trainer.optimizers[0].param_groups
            trainable = sum(p.requires_grad for p in pl_module.model.features.parameters())
            seen.append((len(groups), pl_module.model.frozen_stages, trainable))

    run = train.fit(config, callbacks=[Spy()])
    n_stages = 5  # resnet18 trunk: stem, layer1..layer4
    assert [s[1] for s in seen] == [n_stages, n_stages - 2, 0]
    assert [s[0] for s in seen] == [1, 2, 3]  # head, then each newly unfrozen block joins
    assert seen[0][2] == 0 and 0 < seen[1][2] < seen[2][2]
    assert (run / "model.pt").is_file()


def test_bad_unfreeze_schedule_is_a_user_error(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="EPOCH:STAGES"):
        train.fit(tiny_config(tiny_dataset, tmp_path / "runs", unfreeze_at="two:3"))


def test_frozen_batchnorm_keeps_pretrained_statistics_while_weights_train(tiny_dataset, tmp_path):
    from pneumoscan.modeling import models

    model, _ = models.build("resnet18", unfreeze_blocks=-1, batchnorm="frozen")
    model.train()
    bns = [m for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[-1].running_mean.clone()
    model(torch.rand(4, 1, 48, 48)).sum().backward()
    assert torch.equal(before, bns[-1].running_mean)
    assert bns[-1].weight.grad is not None  # its affine weights still learn
    with pytest.raises(UserError, match="train or frozen"):
        models.build("resnet18", batchnorm="fixed")


def test_label_smoothing_and_cosine_schedule(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "runs", epochs=2, schedule="cosine", label_smoothing=0.2)
    config.model.unfreeze_blocks = 1
    lrs = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    run = train.fit(config, callbacks=[Spy()])
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(0.5e-3)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["label_smoothing"] == 0.2
    # smoothing: a perfectly confident, correct logit still has a loss
    lit = litmodule.LitClassifier(torch.nn.Linear(1, 1), label_smoothing=0.2, from_features=True)
    lit.model.classify = lambda x: torch.full((2,), 20.0)
    lit.log = lit.log_dict = lambda *a, **k: None
    loss = lit._step((torch.zeros(2, 1), torch.ones(2)), "train", lit.train_metrics)
    assert loss.item() > 1.0
    assert lit._step((torch.zeros(2, 1), torch.ones(2)), "val", lit.val_metrics).item() < 1e-6


def test_mixup_mixes_inputs_and_targets_and_weight_decay_selects_adamw(tiny_dataset, tmp_path):
    seen = []
    lit = litmodule.LitClassifier(torch.nn.Linear(1, 1), class_weights=(2.0, 0.5), from_features=True, mixup=0.4)
    lit.model.classify = lambda x: (seen.append(x.clone()), x[:, 0] * 3)[1]
    lit.log = lit.log_dict = lambda *a, **k: None
    x, y = torch.tensor([[1.0], [0.0], [-1.0], [2.0]]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.manual_seed(0)
    loss = lit._step((x, y), "train", lit.train_metrics)
    torch.manual_seed(0)
    lam, other = lit._mix(4, y.device)
    assert 0 < lam < 1 and sorted(other.tolist()) == [0, 1, 2, 3]
    mixed = lam * x + (1 - lam) * x[other]
    assert torch.allclose(seen[0], mixed)  # the head saw the mixed batch
    expected = lam * lit._train_loss(mixed[:, 0] * 3, y) + (1 - lam) * lit._train_loss(mixed[:, 0] * 3, y[other])
    assert loss.item() == pytest.approx(expected.item())
    assert lit._step((x, y), "val", lit.val_metrics).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(x[:, 0] * 3, y).item())  # validation never mixes
    # a run with both records them and trains with AdamW
    config = tiny_config(tiny_dataset, tmp_path / "runs", weight_decay=0.05, mixup=0.2)
    optimizers = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            optimizers.append(trainer.optimizers[0])

    run = train.fit(config, callbacks=[Spy()])
    assert isinstance(optimizers[0], torch.optim.AdamW) and optimizers[0].param_groups[0]["weight_decay"] == 0.05
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["weight_decay"], saved["mixup"]) == (0.05, 0.2)


@pytest.mark.parametrize("fast", [True, False])
def test_head_batchnorm_trains_while_frozen_stages_stay_in_eval(tiny_dataset, tmp_path, fast):
    config = tiny_config(tiny_dataset, tmp_path / "runs", feature_cache=fast)
    config.model.backbone, config.model.unfreeze_blocks = "resnet18", 0
    modes = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            model = pl_module.model
            modes["head_bn"] = [m.training for m in model.head if isinstance(m, torch.nn.BatchNorm1d)]
            modes["backbone"] = [m.training for stage in model.features.children() for m in stage.modules()]

    train.fit(config, callbacks=[Spy()])
    assert modes["head_bn"] == [True, True]  # the seed head: 64, bn, bn, 32
    assert not any(modes["backbone"])  # frozen stages keep their ImageNet statistics


def test_linear_probe_then_fine_tune_and_wise_interpolation(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "runs", linear_probe_epochs=2, wise_alpha=0.5, views=1)
    config.model.unfreeze_blocks = -1
    run = train.fit(config, report=False)
    probe = torch.load(run / "linear-probe" / "weights.pt", weights_only=True)
    tuned = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    saved, _ = artifact.load(run / "model.pt")
    name = "features.0.0.weight"
    # the probe trained only the head: its backbone is the initial one; the saved weights lie halfway
    expected = 0.5 * probe[name] + 0.5 * tuned[f"model.{name}"]
    assert torch.allclose(saved.state_dict()[name], expected, atol=1e-6)
    assert not torch.allclose(probe[name], tuned[f"model.{name}"])


def test_interpolate_keeps_counters_and_mixes_floats():
    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    a.weight.data.fill_(1.0)
    b.weight.data.fill_(3.0)
    a.num_batches_tracked.fill_(5)
    finetune.interpolate(a, b.state_dict(), 0.25)
    assert torch.allclose(a.weight, torch.full((3,), 2.5))
    assert int(a.num_batches_tracked) == 5


@pytest.mark.parametrize("changes, message", [
    ({"linear_probe_epochs": 2}, "backbone is frozen"),
    ({"wise_alpha": 0.5}, "needs train.linear_probe_epochs"),
])
def test_lp_ft_settings_that_cannot_work_are_config_errors(tiny_dataset, tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        tiny_config(tiny_dataset, tmp_path / "runs", **changes).validate()


def test_finalize_writes_the_unsure_band_and_the_calibration_prior(tiny_dataset, tmp_path):
    run = train.fit(tiny_config(tiny_dataset, tmp_path / "runs", unsure="conformal:0.8"), report=False)
    meta = artifact.read_meta(run / "model.pt")
    u = meta.unsure
    assert u["confidence"] == 0.8 and u["rule"] == "conformal:0.8" and u["n_calibration"] == meta.training.n_val
    assert u["low"] <= meta.threshold < u["high"]
    val = json.loads((run / "validation" / "metrics.json").read_text())
    assert val["selective"]["band"] == [u["low"], u["high"]] and val["selective"]["n"] == meta.training.n_val
    counts = u["class_counts"]
    assert meta.prior["calibration"] == pytest.approx(counts["PNEUMONIA"] / sum(counts.values()))
    assert 0 < meta.prior["effective"] < 1 and meta.prior["calibration_source"] == "validation split"
    off = train.fit(tiny_config(tiny_dataset, tmp_path / "runs2", unsure="none"), report=False)
    assert artifact.read_meta(off / "model.pt").unsure is None
    assert "selective" not in json.loads((off / "validation" / "metrics.json").read_text())
