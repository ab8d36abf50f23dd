"""Grad-CAM: maps of the input's shape in [0, 1] for every backbone, hooks released, the caller's
model untouched, and the model-randomisation sanity check of Adebayo et al. (2018)."""

import csv
import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import synthetic_xray
from pneumoscan.modeling import artifact, backbones, models
from pneumoscan.cli import app as cli, common
from pneumoscan.evaluation import cams as cam_module, explain
from pneumoscan.core.errors import UserError
from pneumoscan.inference.torch_model import as_batch, predict_logits

SIZE = 64  # the smallest input whose last feature map is 2x2 for every backbone, so maps have a location


def _images(n: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return np.stack([synthetic_xray(rng, int(y), size) for y in labels]), labels


def _calibrate_batchnorm(model: models.Classifier, x: torch.Tensor) -> None:
    """Set every BatchNorm's statistics to those of ``x`` (one pass, cumulative average).

    A random-init backbone in eval mode shrinks activations to ~1e-9 and maps every input to the
    same features; and after a few training steps the running averages lag the weights. Measured
    statistics make inference see the network that training saw.
    """
    model.eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.fixture(scope="module", params=list(backbones.BACKBONES))
def trained(request):
    """(model, architecture, PNEUMONIA training images it scores positive) for a tiny model of each backbone.

    The last three stages and a linear head train for a few steps on synthetic X-rays (frozen
    stages get data statistics first, see above). With a linear head a positive logit implies
    positive evidence somewhere in the map, so the maps of these images have a location.
    """
    torch.manual_seed(0)
    images, labels = _images(48)
    model, _ = models.build(request.param, weights="none", head="linear", unfreeze_blocks=3)
    x, y = as_batch(images), torch.tensor(labels, dtype=torch.float32)
    _calibrate_batchnorm(model, x)
    opt = torch.optim.Adam(models.parameter_groups(model, 3e-3, 3e-3))
    model.train()
    for _ in range(20):
        idx = torch.randperm(len(x))[:16]
        loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    _calibrate_batchnorm(model, x)
    logits = predict_logits(model, images)
    positive = images[(labels == 1) & (logits > 0)][:4]
    assert len(positive) >= 3, f"the tiny {request.param} did not learn: logits {logits}"
    return model, request.param, positive


def _flat(cam: np.ndarray) -> bool:
    return float(np.ptp(cam)) == 0.0


@pytest.mark.slow
def test_maps_match_the_input_and_hooks_are_released(trained, monkeypatch):
    model, meta, positive = trained
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_during = []

    class Spy(explain.METHODS["gradcam"]):
        def __call__(self, *args, **kwargs):
            hooks_during.append(len(self.target_layers[0]._forward_hooks))
            return super().__call__(*args, **kwargs)

    layers = []
    real_cam_layer = explain.cam_layer

    def spy_layer(net, meta_):
        layers.append(real_cam_layer(net, meta_))
        return layers[-1]

    monkeypatch.setitem(explain.METHODS, "gradcam", Spy)
    monkeypatch.setattr(cam_module, "cam_layer", spy_layer)  # where compute_cams looks it up
    images = np.concatenate([_images(2, seed=1)[0], positive[:2]])
    cams = explain.compute_cams(model, meta, images, batch_size=3)

    assert cams.shape == images.shape and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert not _flat(cams[2]) and not _flat(cams[3]), "a map of a PNEUMONIA image has no location"
    assert hooks_during and all(n > 0 for n in hooks_during)  # the spy saw the hooked layer...
    assert len(layers) == 1 and not layers[0]._forward_hooks  # ...and nothing is left on it
    # the caller's model: same trainable flags, same weights, still in eval mode
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())


class _HalvesTrunk(nn.Module):
    """Two feature maps fixed by construction: channel 0 is the image's left half, channel 1 its
    right half (a 1x1 convolution, so the map keeps a gradient, times fixed masks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        left = (torch.arange(x.shape[-1]) < x.shape[-1] // 2).to(y.dtype)
        return torch.stack([y[:, 0] * left, y[:, 1] * (1 - left)], dim=1)


def _halves_model(weights: tuple[float, float]) -> models.Classifier:
    """A Classifier laid out like resnet18's (Grad-CAM reads ``features.4``) whose head weighs the
    left and right halves by ``weights``."""
    features = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity(), _HalvesTrunk())
    head = nn.Sequential(nn.Linear(2, 1))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([weights]))
        head[0].bias.zero_()
    return models.Classifier(features, head, normalization="unit").eval()


def test_sanity_check_maps_follow_the_head():
    """The model-randomisation check of Adebayo et al. (2018) with the head set by hand instead of
    drawn: Grad-CAM weighs each feature map by the head's gradient, so a head that reads the left
    half lights the left half and one that reads the right half the right. EigenCAM never looks at
    the head: its map is the same for both, which is why it fails the check."""
    images = np.full((2, 32, 32), 200, dtype=np.uint8)
    left_cams = explain.compute_cams(_halves_model((1.0, 0.0)), "resnet18", images)
    right_cams = explain.compute_cams(_halves_model((0.0, 1.0)), "resnet18", images)
    for left, right in zip(left_cams, right_cams):
        assert left[:, :14].min() > 0.9 and left[:, 18:].max() < 0.1
        assert right[:, 18:].min() > 0.9 and right[:, :14].max() < 0.1
    eigen = [explain.compute_cams(_halves_model(w), "resnet18", images, "eigencam") for w in ((1.0, 0.0), (0.0, 1.0))]
    np.testing.assert_allclose(eigen[0], eigen[1], atol=1e-6)


def test_frozen_model_under_inference_mode_still_gets_maps():
    model, _ = models.build("resnet18", weights="none", head="linear")  # frozen backbone: no grads anywhere
    flags = [p.requires_grad for p in model.parameters()]
    assert not any(flags[:-2])
    images, _ = _images(2)
    with torch.inference_mode():
        cams = explain.compute_cams(model.eval(), "resnet18", images, "gradcam++")
    assert cams.shape == images.shape and np.isfinite(cams).all()
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_flat_or_nan_maps_become_zeros(value, caplog):
    model, _ = models.build("resnet18", weights="none", head="linear")
    with torch.no_grad():
        model.head[-1].weight.fill_(value)  # 0: the logit ignores the features; nan: it is nan
    images, _ = _images(2)
    with caplog.at_level(logging.INFO, logger="pneumoscan.evaluation.cams"):
        cams = explain.compute_cams(model, "resnet18", images)
    assert cams.shape == images.shape and not cams.any()
    assert "2 of 2 maps are flat or not finite" in caplog.text


def test_unknown_method_and_bad_input():
    model, _ = models.build("resnet18", weights="none", head="linear")
    with pytest.raises(UserError, match="gradcam"):
        explain.compute_cams(model, "resnet18", _images(1)[0], method="lime")
    with pytest.raises(ValueError, match="uint8"):
        explain.compute_cams(model, "resnet18", np.zeros((1, 8, 8), np.float32))
    assert explain.compute_cams(model, "resnet18", np.zeros((0, 8, 8), np.uint8)).shape == (0, 8, 8)


def test_overlay_is_rgb_of_the_image_size():
    image = _images(1)[0][0]
    cam = np.zeros(image.shape, np.float32)
    cam[:8, :8] = 1.0
    rgb = explain.overlay(image, cam)
    assert rgb.shape == image.shape + (3,) and rgb.dtype == np.uint8
    assert rgb[:8, :8, 0].mean() > rgb[-8:, -8:, 0].mean()  # the hot corner is red in the jet map
    with pytest.raises(ValueError):
        explain.overlay(image, cam[:10])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model, info = models.build("mobilenet_v2", weights="none", head="linear")
    meta = artifact.make_meta(architecture="mobilenet_v2", head="linear", image_size=SIZE, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    return artifact.save(tmp_path_factory.mktemp("model") / "model.pt", model, meta)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(3)
    for sub, label in (("a", 0), ("b", 1)):  # the same file name in two folders
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(synthetic_xray(rng, label, 80)).save(tmp_path / "in" / sub / "x.jpeg")
    (tmp_path / "in" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path / "in"


def test_explain_files_writes_one_png_per_readable_image(model_file, image_folder, tmp_path):
    written, skipped = explain.explain_files(model_file, [image_folder], tmp_path / "out", "gradcam")
    assert sorted(p.name for p in written) == ["x-2.gradcam.png", "x.gradcam.png"]
    assert [p for p, _ in skipped] == [str(image_folder / "b" / "broken.png")]
    assert (tmp_path / "out" / "skipped.csv").is_file()
    with Image.open(written[0]) as png:
        assert png.format == "PNG" and png.width > 300


def test_cli_explain_and_predict_explain(model_file, image_folder, tmp_path, capsys):
    assert common.CAM_METHODS == tuple(explain.METHODS)
    code = cli.main(["explain", "--model", str(model_file), str(image_folder / "a"), "--out", str(tmp_path / "e"),
                     "--method", "eigencam"])
    assert code == 0 and (tmp_path / "e" / "x.eigencam.png").is_file()

    code = cli.main(["predict", "--model", str(model_file), str(image_folder), "--engine", "torch",
                     "--out", str(tmp_path / "p.csv"), "--explain", str(tmp_path / "overlays")])
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err  # the unreadable file is named, the others explained
    assert len(list((tmp_path / "overlays").glob("*.gradcam.png"))) == 2


# --- maps that cannot be misread (issue 14) -----------------------------------------------------

def test_absolute_scale_makes_a_low_score_look_low():
    cam = np.zeros((20, 20), np.float32)
    cam[5:10, 5:10] = 1.0
    assert explain.scale_cam(cam, 0.9, "relative").max() == 1.0
    assert explain.scale_cam(cam, 0.001, "absolute").max() == pytest.approx(0.001)
    assert explain.scale_cam(cam, 0.7, "absolute").max() == pytest.approx(0.7)
    with pytest.raises(ValueError):
        explain.scale_cam(cam, None, "absolute")
    with pytest.raises(UserError):
        explain.scale_cam(cam, 0.5, "percentile")


def test_mass_fractions_of_the_lungs_the_border_and_a_flat_map():
    h = w = 100
    lungs, border = explain.lung_field_mask(h, w), explain.border_mask(h, w)
    assert lungs[47, 29] and lungs[47, 71] and not lungs[47, 50]  # both lung fields, not the mediastinum
    assert not (lungs & border).any() and border[0].all() and border[:, -1].all() and not border[8:92, 8:92].any()
    in_lung = np.zeros((h, w), np.float32)
    in_lung[40:50, 25:33] = 1.0
    assert explain.mass_fractions(in_lung) == (0.0, 0.0)
    corner = np.zeros((h, w), np.float32)
    corner[:5, :5] = 1.0  # an "R" marker in the corner
    assert explain.mass_fractions(corner) == (1.0, 1.0)
    half = in_lung + corner * (in_lung.sum() / corner.sum())
    assert explain.mass_fractions(half) == pytest.approx((0.5, 0.5), abs=1e-4)
    assert explain.mass_fractions(half * 0.01) == explain.mass_fractions(half)  # scale-free
    assert explain.mass_fractions(np.zeros((h, w), np.float32)) == (None, None)


def test_explanations_name_their_scale_and_flag_flat_maps():
    images, _ = _images(2)
    cams = np.zeros(images.shape, np.float32)
    cams[1, 10:20, 10:20] = 1.0
    flat, hot = explain.explanations(images, cams, [0.2, 0.8])
    assert flat.flat and flat.fields() == {"cam_scale": "absolute", "cam_flat": True, "cam_outside_lungs": None,
                                           "cam_on_border": None}
    assert not hot.flat and hot.scale == "absolute" and 0 <= hot.outside_lung_fraction <= 1
    assert Image.open(io.BytesIO(hot.png)).size == images.shape[1:][::-1]
    assert explain.explanations(images, cams)[1].scale == "relative"  # no probabilities: relative
    # absolute: the same map drawn dimmer for a lower probability
    dim, bright = (np.asarray(Image.open(io.BytesIO(e.png))).astype(int)
                   for e in (explain.explanations(images[1:], cams[1:], [p])[0] for p in (0.05, 0.95)))
    assert bright[10:20, 10:20, 0].mean() > dim[10:20, 10:20, 0].mean() + 50  # red channel of the hot spot


def test_explain_files_writes_explanations_csv(model_file, image_folder, tmp_path):
    written, _ = explain.explain_files(model_file, [image_folder], tmp_path / "out", "gradcam", scale="relative")
    with open(tmp_path / "out" / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == explain.EXPLANATION_COLUMNS
    assert sorted(r["png"] for r in rows) == sorted(p.name for p in written)
    for r in rows:
        assert r["cam_scale"] == "relative" and r["cam_flat"] in ("0", "1")
        if r["cam_flat"] == "0":
            assert 0 <= float(r["cam_outside_lungs"]) <= 1 and 0 <= float(r["cam_on_border"]) <= 1


def test_flat_map_png_says_so(tmp_path):
    import matplotlib.text

    image = _images(1)[0][0]
    seen: list[str] = []
    real = matplotlib.text.Text.set_text

    def spy(self, s):
        seen.append(str(s))
        return real(self, s)

    matplotlib.text.Text.set_text = spy
    try:
        explain.save_explanation(image, np.zeros(image.shape, np.float32), 0.0, "NORMAL", tmp_path / "f.png")
        flat_texts = list(seen)
        seen.clear()
        cam = np.zeros(image.shape, np.float32)
        cam[:4, :4] = 1
        explain.save_explanation(image, cam, 0.3, "NORMAL", tmp_path / "h.png", scale="relative")
    finally:
        matplotlib.text.Text.set_text = real
    assert any(explain.FLAT_TEXT in t for t in flat_texts)
    assert any("relative: scaled to this image's maximum" in t for t in seen)
    assert any("outside lung fields" in t for t in seen) and not any(explain.FLAT_TEXT in t for t in seen)


@pytest.mark.slow
def test_reused_explainer_gives_the_maps_of_a_fresh_compute(trained):
    """One CamExplainer over many calls (as the service and explain_files use it) answers like a
    fresh compute_cams each time, leaves the caller's model alone, and releases its hooks."""
    model, architecture, positive = trained
    flags = [p.requires_grad for p in model.parameters()]
    images = np.concatenate([_images(3, seed=2)[0], positive[:2]])
    with explain.CamExplainer(model, architecture) as explainer:
        for chunk in (images[:2], images[2:], images):
            reused = explain.compute_cams(model, architecture, chunk, explainer=explainer)
            np.testing.assert_allclose(reused, explain.compute_cams(model, architecture, chunk), atol=1e-5)
        assert explainer.net is not model and not any(p.requires_grad for p in explainer.net.parameters())
    assert not explain.cam_layer(explainer.net, architecture)._forward_hooks
    assert [p.requires_grad for p in model.parameters()] == flags
