import pytest
import torch

from pneumoscan.modeling import artifact, models
from pneumoscan.core.errors import UserError


def _meta(info, **kw):
    return artifact.make_meta(architecture="resnet18", head="seed", image_size=32, weights_info=info,
                              threshold=0.37, threshold_rule="youden", config={"k": 1}, **kw)


def test_round_trip_restores_weights_meaning_and_outputs(tmp_path):
    model, info = models.build("resnet18", weights="none", normalization="inception")
    model.temperature.fill_(1.7)
    model.eval()
    x = torch.rand(2, 1, 32, 32)
    path = artifact.save(tmp_path / "model.pt", model, _meta(info))
    loaded, meta = artifact.load(path)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert meta.threshold == 0.37 and meta.temperature == pytest.approx(1.7)
    assert meta.class_names == ("NORMAL", "PNEUMONIA")
    assert meta.normalization.mean == (0.5, 0.5, 0.5)
    # loads with the safe loader only: nothing but tensors and plain values inside
    torch.load(path, weights_only=True)
    assert not list(tmp_path.glob("*.tmp*"))


def test_tf_padding_survives_the_round_trip(tmp_path):
    model, info = models.build("mobilenet_v2", weights="none", tf_same_padding=True)
    model.eval()
    path = artifact.save(tmp_path / "m.pt", model, _meta(info).replace(architecture="mobilenet_v2"))
    loaded, meta = artifact.load(path)
    assert meta.tf_same_padding
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        artifact.load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable"):
        artifact.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not a pneumoscan model"):
        artifact.load(other)


def test_half_precision_storage_is_smaller_and_loads_as_fp32(tmp_path):
    model, info = models.build("mobilenet_v2", weights="none")
    model.eval()
    full = artifact.save(tmp_path / "full.pt", model, _meta(info).replace(architecture="mobilenet_v2"))
    half = artifact.save(tmp_path / "half.pt", model, _meta(info).replace(architecture="mobilenet_v2"), half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = artifact.load(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-2)


def test_meta_round_trips_through_the_plain_dict_and_keeps_unknown_keys():
    _, info = models.build("resnet18", weights="none")
    meta = _meta(info).replace(training=artifact.TrainingInfo(epochs_run=3, n_train=10))
    raw = meta.to_dict() | {"added_later": {"x": 1}}
    back = artifact.ModelMeta.from_dict(raw)
    assert back.to_dict() == raw and back.extra == {"added_later": {"x": 1}}
    assert back.training.epochs_run == 3 and back.label(0.5) == "PNEUMONIA" and back.label(0.2) == "NORMAL"
    with pytest.raises(UserError, match="lacks image_size"):
        artifact.ModelMeta.from_dict({k: v for k, v in raw.items() if k != "image_size"})


def test_add_data_digests_changes_only_the_meta(tmp_path):
    import torch

    from pneumoscan.core.files import content_digest, content_digests, file_sha256

    model, info = models.build("mobilenet_v2", weights="none", head="linear")
    meta = artifact.make_meta(architecture="mobilenet_v2", head="linear", image_size=32, weights_info=info,
                              threshold=0.5, threshold_rule="0.5", config={})
    path = artifact.save(tmp_path / "model.pt", model, meta, half=True)
    assert artifact.read_meta(path).data_digests == ()  # what an older model reads as
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one image")
    b.write_bytes(b"another image")
    (tmp_path / "copy.png").write_bytes(b"one image")
    digests = content_digests([a, b, tmp_path / "copy.png"])
    assert digests == sorted({content_digest(a), content_digest(b)}) and all(len(d) == 16 for d in digests)
    before = file_sha256(path)
    out = artifact.add_data_digests(path, digests, tmp_path / "with.pt")
    assert file_sha256(path) == before  # --out leaves the original alone
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert blob["meta"]["data_digests"] == digests
    original = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, original[k]) and v.dtype == original[k].dtype for k, v in blob["state_dict"].items())
    assert artifact.load(out)[1].data_digests == tuple(digests)
