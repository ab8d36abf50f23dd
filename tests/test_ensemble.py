"""Multi-member models: the Ensemble module, its file, its ONNX graph, every command on it, and
``pneumoscan ensemble`` combining run folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_dataset, synthetic_xray
from pneumoscan.modeling import artifact, backbones, heads, models
from pneumoscan.cli import app as cli
from pneumoscan.io import data
from pneumoscan.training import ensemble, train
from pneumoscan.evaluation import explain
from pneumoscan.core import calibration, metrics
from pneumoscan.safety import ood
from pneumoscan.core.config import RunConfig
from pneumoscan.core.errors import UserError
from pneumoscan.inference import onnx_export
from pneumoscan.inference.engines import OnnxEngine, TorchEngine
from pneumoscan.inference.loading import load_engine
from pneumoscan.inference.torch_model import as_batch

pytestmark = pytest.mark.slow  # most tests here train models (minutes on two cores)

SIZE = 48


def xrays(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([synthetic_xray(rng, i % 2, SIZE) for i in range(n)])


def _spread_batchnorm(model: models.Classifier) -> None:
    """Running statistics of real-looking images: untrained defaults score every image the same,
    and parity on constants proves nothing."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(as_batch(xrays(16, seed=0)))
    model.eval()


def two_members() -> tuple[list[models.Classifier], list[artifact.ModelMeta]]:
    """A MobileNetV2 (imagenet normalisation, TF padding) and a ResNet-18 (inception normalisation)."""
    torch.manual_seed(0)
    nets, metas = [], []
    for name, head, norm, pad, t in (("mobilenet_v2", "linear", "imagenet", True, 2.0),
                                     ("resnet18", "seed", "inception", False, 0.7)):
        net, info = models.build(name, weights="none", head=head, normalization=norm, tf_same_padding=pad)
        _spread_batchnorm(net)
        net.temperature.fill_(t)
        nets.append(net)
        metas.append(artifact.make_meta(architecture=name, head=head, image_size=SIZE, weights_info=info,
                                        threshold=0.5, threshold_rule="youden", config={"model": {"backbone": name}}))
    return nets, metas


def ensemble_file(path, *, with_ood: bool = False) -> tuple[models.Ensemble, artifact.ModelMeta]:
    nets, metas = two_members()
    model = models.Ensemble(nets, [m.architecture for m in metas]).eval()
    model.temperature.fill_(1.3)
    detector = None
    if with_ood:
        g = torch.Generator().manual_seed(1)
        d = model.feature_dim
        model.ood_head = heads.MahalanobisHead(torch.randn(d, 4, generator=g), torch.randn(4, generator=g),
                                                torch.randn(2, 4, generator=g))
        detector = {"l2_normalize": True, "cutoff_not_chest": 1e9, "cutoff_ood": 1e9, "percentile": 99.5,
                    "ood_percentile": 97.5, "n_val": 8}  # cut-offs no image reaches: labels stay
    members = tuple(artifact.Member(m.architecture, m.head, m.normalization, m.tf_same_padding, m.temperature,
                                    m.backbone_weights) for m in metas)
    meta = metas[0].replace(architecture=artifact.ENSEMBLE, head=ensemble.COMBINATION,
                            normalization=artifact.PER_MEMBER, tf_same_padding=False, members=members,
                            threshold=0.45, ood=detector)
    artifact.save(path, model, meta)
    return model, meta


@pytest.fixture(scope="module")
def ens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ensemble") / "model.pt"
    ensemble_file(path, with_ood=True)
    return path


def test_logit_is_the_mean_of_calibrated_member_logits_over_the_ensemble_temperature():
    nets, metas = two_members()
    model = models.Ensemble(nets, [m.architecture for m in metas]).eval()
    model.temperature.fill_(1.3)
    x = as_batch(xrays(4))
    with torch.no_grad():
        raw = [net.head(net.embed(x)).squeeze(1) for net in nets]
        expected = (raw[0] / 2.0 + raw[1] / 0.7) / 2 / 1.3
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert model.embed(x).shape == (4, 1280 + 512) == (4, model.feature_dim)
        logit, score = model.assess(x)
    assert torch.allclose(logit, expected, atol=1e-5) and torch.isnan(score).all()
    with pytest.raises(ValueError):
        models.Ensemble(nets[:1], ["mobilenet_v2"])


def test_members_on_one_frozen_backbone_share_its_pass_and_give_the_same_answer(tmp_path, monkeypatch):
    """Two heads on one backbone (the default recipe's members) run the backbone once."""
    import copy

    first, meta = models.build("mobilenet_v2", weights="none", head="linear", tf_same_padding=True)
    _spread_batchnorm(first)
    second = copy.deepcopy(first)
    second.head = heads.build_head("seed", first.feature_dim).eval()
    model = models.Ensemble([first, second], ["mobilenet_v2"] * 2).eval()
    assert model.sources == (0, 0)
    assert models.cam_layer_paths(model, artifact.ENSEMBLE) == ["members.0.features.18"]
    x = as_batch(xrays(3))
    calls = []
    monkeypatch.setattr(second, "embed", lambda t: calls.append(t) or first.embed(t))
    with torch.no_grad():
        shared = model.assess(x)
        assert not calls  # the second member's backbone never ran
        expected = torch.stack([first.classify(first.embed(x)), second.classify(first.embed(x))], 1).mean(1)
        assert torch.equal(shared[0], expected)
    monkeypatch.undo()
    # a backbone that differs in one tensor, in its normalisation or in its padding is its own pass
    for change in (lambda n: n.features[18][1].running_mean.add_(1e-3), lambda n: n.std.mul_(2),
                   lambda n: backbones.use_tf_same_padding(n.features)):
        other = copy.deepcopy(first if change is not backbones.use_tf_same_padding else
                              models.build("mobilenet_v2", weights="none", head="linear")[0])
        if change is backbones.use_tf_same_padding:
            other.load_state_dict(first.state_dict())
        change(other)
        assert models.Ensemble([first, other], ["mobilenet_v2"] * 2).sources == (0, 1)
    # a saved ensemble is rebuilt from random weights: sharing is found again once its state loads
    meta_of = artifact.make_meta(architecture="mobilenet_v2", head="linear", image_size=SIZE, weights_info=meta,
                                 threshold=0.5, threshold_rule="youden", config={})
    members = tuple(artifact.Member("mobilenet_v2", h, meta_of.normalization, True, 1.0, meta_of.backbone_weights)
                    for h in ("linear", "seed"))
    artifact.save(tmp_path / "shared.pt", model, meta_of.replace(
        architecture=artifact.ENSEMBLE, head=ensemble.COMBINATION, normalization=artifact.PER_MEMBER,
        tf_same_padding=False, members=members))
    loaded, _ = artifact.load(tmp_path / "shared.pt")
    assert loaded.sources == (0, 0)
    with torch.no_grad():
        assert torch.equal(loaded(x), shared[0])


def test_round_trip_with_members_of_different_normalisations(tmp_path):
    model, _ = ensemble_file(tmp_path / "model.pt", with_ood=True)
    loaded, meta = artifact.load(tmp_path / "model.pt")
    x = as_batch(xrays(3))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        assert torch.allclose(loaded.assess(x)[1], model.assess(x)[1], rtol=1e-5)
    assert isinstance(loaded, models.Ensemble) and meta.is_ensemble and meta.architecture == "ensemble"
    assert [m.normalization.name for m in meta.members] == ["imagenet", "inception"]
    assert [m.tf_same_padding for m in meta.members] == [True, False]
    assert [m.temperature for m in meta.members] == pytest.approx([2.0, 0.7])
    assert meta.temperature == pytest.approx(1.3)
    assert artifact.ModelMeta.from_dict(meta.to_dict()) == meta
    torch.load(tmp_path / "model.pt", weights_only=True)  # still only tensors and plain values
    # fp16 storage: the members halve, the ensemble's OOD head stays fp32, and it loads to fp32
    artifact.save(tmp_path / "half.pt", loaded, meta, half=True)
    state = torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"]
    assert state["members.1.head.0.weight"].dtype == torch.float16 and state["ood_head.W"].dtype == torch.float32
    half, _ = artifact.load(tmp_path / "half.pt")
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(half(x)), torch.sigmoid(model(x)), atol=1e-2)


def test_a_single_models_meta_dict_is_unchanged():
    _, info = models.build("resnet18", weights="none")
    meta = artifact.make_meta(architecture="resnet18", head="seed", image_size=32, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    assert "members" not in meta.to_dict() and not meta.is_ensemble
    with pytest.raises(UserError, match="members"):
        artifact.ModelMeta.from_dict(meta.to_dict() | {"architecture": "ensemble"})
    # the bundled model (the default recipe: an ensemble) loads and runs through its shipped ONNX export
    model, bundled = artifact.load(None)
    assert isinstance(model, models.Ensemble) and len(bundled.members) == 2
    engine = load_engine(None)
    assert engine.name == "onnxruntime" and engine.onnx_path.name == "model.onnx"


def test_one_onnx_graph_matches_pytorch_and_scores_in_the_engine(ens_file, tmp_path):
    out = onnx_export.export_onnx(ens_file, tmp_path / "ensemble.onnx", check_images=xrays(8))
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["logit", "ood_score"]
    images = xrays(7, seed=5)
    torch_logit, torch_ood = TorchEngine(ens_file).assess(images)
    onnx_logit, onnx_ood = OnnxEngine(out).assess(images, batch_size=3)
    assert np.abs(metrics.sigmoid(onnx_logit) - metrics.sigmoid(torch_logit)).max() < 1e-4
    assert np.allclose(onnx_ood, torch_ood, rtol=1e-3)
    assert np.ptp(torch_logit) > 1e-3  # the scores differ between images: parity means something
    engine = load_engine(ens_file)  # a .pt ensemble runs through its cached export
    assert engine.name == "onnxruntime" and engine.meta.is_ensemble and len(engine.meta.members) == 2


def _image_folder(path, n: int = 3):
    path.mkdir()
    for i, image in enumerate(xrays(n, seed=9)):
        Image.fromarray(image).save(path / f"x{i}.png")
    return path


def test_predict_and_explain_commands_on_an_ensemble(ens_file, tmp_path, capsys):
    folder = _image_folder(tmp_path / "in")
    assert cli.main(["predict", "--model", str(ens_file), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("path,probability")
    expected = metrics.sigmoid(TorchEngine(ens_file).predict_logits(xrays(3, seed=9)))
    assert [float(r.split(",")[1]) for r in rows[1:]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert cli.main(["explain", "--model", str(ens_file), str(folder), "--out", str(tmp_path / "cams")]) == 0
    assert len(list((tmp_path / "cams").glob("*.png"))) == 3


def test_grad_cam_explains_every_member_and_releases_its_hooks(ens_file):
    model, meta = artifact.load(ens_file)
    images = xrays(2)
    with explain.CamExplainer(model, meta.architecture) as explainer:
        layers = explain.cam_layers(explainer.net, meta.architecture)
        assert len(layers) == 2 and layers[0] is explainer.net.members[0].features[18]
        cams = explain.compute_cams(model, meta.architecture, images, explainer=explainer)
    assert cams.shape == images.shape and cams.dtype == np.float32 and cams.max() > 0
    assert not any(layer._forward_hooks for layer in layers)
    # each member's map counts: the ensemble's differs from either member's alone
    alone = explain.compute_cams(model.members[0], "mobilenet_v2", images)
    assert not np.allclose(alone, cams, atol=1e-3)


def test_service_model_card_describes_the_members(ens_file):
    from pneumoscan.serve.app import create_app

    with TestClient(create_app(ens_file)) as client:
        card = client.get("/v1/model").json()
    assert card["architecture"] == "ensemble" and card["normalization"] == "per-member"
    assert [(m["architecture"], m["normalization"]) for m in card["members"]] == [
        ("mobilenet_v2", "imagenet"), ("resnet18", "inception")]
    assert card["members"][1]["temperature"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- pneumoscan ensemble


def _run(root, out, name: str, **model) -> RunConfig:
    config = RunConfig()
    config.data.root = str(root)
    config.data.image_size = SIZE
    config.data.val_fraction = 0.25
    config.data.batch_size = 8
    config.model.backbone_weights = "none"
    config.model.unfreeze_blocks = 0
    for k, v in model.items():
        setattr(config.model, k, v)
    config.train.precision = "32"
    config.train.epochs = 1
    config.out_dir = str(out)
    config.name = name
    return train.fit(config, report=False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs on the same split: a MobileNetV2 (imagenet normalisation) and a ResNet-18 (inception)."""
    root = make_dataset(tmp_path_factory.mktemp("data") / "chest_xray", {"train": (24, 24), "test": (4, 4)})
    out = tmp_path_factory.mktemp("runs")
    return (_run(root, out, "a", head="linear"),
            _run(root, out, "b", backbone="resnet18", weights_normalization="inception"))


def test_combine_fits_temperature_threshold_and_ood_on_the_shared_validation(two_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(ood, "MIN_VALIDATION", 4)  # the tiny split has a dozen validation films
    out = ensemble.combine(two_runs, tmp_path / "ens", threshold_rule="youden", ood=True)
    model, meta = artifact.load(out / "model.pt")
    assert isinstance(model, models.Ensemble)
    assert [m.architecture for m in meta.members] == ["mobilenet_v2", "resnet18"]
    assert [m.normalization.name for m in meta.members] == ["imagenet", "inception"]
    members = [artifact.read_meta(r / "model.pt") for r in two_runs]
    assert [m.temperature for m in meta.members] == pytest.approx([m.temperature for m in members])
    assert meta.members[0].source["model_sha256"] and meta.members[1].config["model"]["backbone"] == "resnet18"
    assert set(meta.data_digests) == set(members[0].data_digests) | set(members[1].data_digests)
    assert meta.ood is not None and model.ood_head is not None and meta.threshold_rule == "youden"
    # the stored evaluation is the saved model's answer on the shared validation images
    val = [s for s in data.read_manifest(two_runs[0] / "manifest.csv") if s.split == "val"]
    _, images, _ = data.load_images(val, SIZE)
    y = np.array([s.label for s in val])
    logits = TorchEngine(out / "model.pt").predict_logits(images)
    prob = metrics.sigmoid(logits)
    result = json.loads((out / "validation" / "metrics.json").read_text())
    assert result["n"] == len(val)
    assert result["roc_auc"] == pytest.approx(metrics.binary_metrics(y, prob, 0.5)["roc_auc"])
    assert meta.threshold == pytest.approx(calibration.choose_threshold(y, prob, "youden"), abs=1e-5)
    # the temperature is the one that calibrates the saved model's mean logit on validation
    assert meta.temperature != pytest.approx(1.0)
    assert calibration.fit_temperature(logits * meta.temperature, y) == pytest.approx(meta.temperature, rel=1e-3)
    assert len(result["members"]) == 2 and (out / "members.csv").is_file()
    with pytest.raises(UserError, match="exists"):
        ensemble.combine(two_runs, out)


def test_combine_refuses_runs_with_different_validation_splits(two_runs, tmp_path, capsys):
    other = tmp_path / "b-moved"
    shutil.copytree(two_runs[1], other)
    samples = data.read_manifest(other / "manifest.csv")
    moved = next(s for s in samples if s.split == "val")
    data.write_manifest([s if s != moved else data.Sample(s.path, s.label, s.patient, "train") for s in samples],
                        other / "manifest.csv")
    with pytest.raises(UserError, match=r"validation splits differ: .*lacks 1 of a's"):
        ensemble.combine([two_runs[0], other], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()
    code = cli.main(["ensemble", "--runs", str(two_runs[0]), str(other), "--out", str(tmp_path / "ens")])
    assert code == 2 and "validation splits differ" in capsys.readouterr().err
    assert cli.main(["ensemble", "--runs", str(two_runs[0]), "--out", str(tmp_path / "ens")]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_combine_refuses_other_image_sizes_and_missing_images(two_runs, tmp_path):
    bigger = tmp_path / "b-64"
    shutil.copytree(two_runs[1], bigger)
    blob = torch.load(bigger / "model.pt", weights_only=True)
    blob["meta"]["image_size"] = 64
    torch.save(blob, bigger / "model.pt")
    with pytest.raises(UserError, match="image sizes differ: .*64 px"):
        ensemble.combine([two_runs[0], bigger], tmp_path / "ens")
    moved = tmp_path / "b-moved-data"
    shutil.copytree(two_runs[1], moved)
    samples = data.read_manifest(moved / "manifest.csv")
    data.write_manifest([data.Sample(str(tmp_path / "nowhere" / f"{i}.png"), s.label, s.patient, s.split)
                         for i, s in enumerate(samples)], moved / "manifest.csv")
    first = tmp_path / "a-moved-data"
    shutil.copytree(two_runs[0], first)
    shutil.copy(moved / "manifest.csv", first / "manifest.csv")
    with pytest.raises(UserError, match="not found"):
        ensemble.combine([first, moved], tmp_path / "ens")


def test_evaluate_an_ensemble_with_error_galleries_and_report(two_runs, tmp_path):
    out = ensemble.combine(two_runs, tmp_path / "ens", ood=False)
    data_root = data.read_manifest(two_runs[0] / "manifest.csv")[0].path.split("/train/")[0]
    code = cli.main(["evaluate", "--model", str(out / "model.pt"), "--data", data_root, "--out",
                     str(tmp_path / "eval"), "--bootstrap", "50", "--errors", "2", "--report",
                     "--threshold", "0"])  # every film PNEUMONIA: the 4 NORMAL films are errors for the gallery
    assert code == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["n"] == 8  # the test split
    (_, fp), (fn, _) = result["confusion_matrix"]
    assert (fp, fn) == (4, 0)
    assert list((tmp_path / "eval" / "errors").glob("*/01_*.png"))  # Grad-CAM overlays through both members
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "2 members" in html and "resnet18" in html
    meta = artifact.read_meta(out / "model.pt")
    assert meta.ood is None  # without a detector, only the validation images were fitted on
    assert {s.split for s in data.read_manifest(out / "manifest.csv")} == {"val"}


def _members_config(root, out) -> RunConfig:
    from pneumoscan.core import config as cfg

    c = cfg.recipe("default")
    assert c.train.members == "frozen-acquisition-mixup,seed-study-lite0"  # the package default is an ensemble
    return cfg.apply_overrides(c, [f"data.root={root}", "data.image_size=48", "data.val_fraction=0.25",
                                   "data.batch_size=8", "model.backbone_weights=none", "train.epochs=1",
                                   "train.views=1", "train.precision=32", f"out_dir={out}", "name=ens"])


def test_train_members_trains_each_recipe_on_one_split_and_combines_them(tmp_path, caplog):
    root = make_dataset(tmp_path / "chest_xray", {"train": (24, 24), "test": (4, 4)})
    result = ensemble.fit_members(_members_config(root, tmp_path / "runs"))
    run = result.run_dir
    model, meta = artifact.load(run / "model.pt")
    assert isinstance(model, models.Ensemble) and len(meta.members) == 2
    assert [m.config["data"]["augment"] for m in meta.members] == ["acquisition", "seed"]
    assert [m.architecture for m in meta.members] == ["mobilenet_v2", "efficientnet_lite0"]
    assert [m.config["train"]["mixup"] for m in meta.members] == [0.2, 0.0]
    assert model.sources == (0, 1)  # two backbones: two passes
    assert (run / "members" / "frozen-acquisition-mixup" / "model.pt").is_file()
    assert json.loads((run / "test" / "metrics.json").read_text())["n"] == 8 == result.test.n
    assert set(result.members) == {"frozen-acquisition-mixup", "seed-study-lite0"}  # each member's, in memory
    assert all(m.test.n == 8 and m.validation is not None for m in result.members.values())
    assert (run / "report.html").is_file() and (run / "config.yaml").is_file()
    # an interruption after the members: resuming keeps them and only combines
    (run / "model.pt").unlink()
    caplog.set_level("INFO")
    resumed = ensemble.fit_members(RunConfig(), resume_dir=run)
    assert resumed.run_dir == run  # the kept members' evaluations, read back, are those measured in memory
    assert all(resumed.members[name].evaluations == m.evaluations for name, m in result.members.items())
    assert "member seed-study-lite0: finished earlier, kept" in caplog.text and (run / "model.pt").is_file()
    with pytest.raises(UserError, match="is finished"):
        ensemble.fit_members(RunConfig(), resume_dir=run)


def test_members_must_name_known_single_model_recipes():
    from pneumoscan.core.config import ConfigError, recipe

    c = recipe("seed-study")
    for bad in ("seed-study", "seed-study,nope", "default,seed-study", "seed-study,seed-study"):
        c.train.members = bad
        with pytest.raises(ConfigError, match="train.members"):
            c.validate()
