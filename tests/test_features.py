"""The cached-feature store: same features as embedding afresh, nothing embedded twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan.io import data
from pneumoscan.training import features
from pneumoscan.modeling import models


def _samples(tmp_path, n):
    return [data.Sample(str(tmp_path / f"IM-{i:04d}-0001.jpeg"), i % 2, f"IM-{i:04d}", "train") for i in range(n)]


@pytest.mark.slow  # a few seconds; make test runs it
def test_cached_embed_matches_embed_and_reuses_the_store(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, _ = models.build("resnet18", weights="none")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    samples = _samples(tmp_path, 5)
    key = {"model_info": {"architecture": "resnet18"}, "image_size": 32, "augment": "none"}
    first = features.cached_embed(model, images, samples, cache_dir=tmp_path / "c", key_info=key)
    assert first.shape == (5, 1, 512)
    assert torch.allclose(first[:, 0], features.embed(model, images), atol=1e-2)  # stored as fp16

    calls = []
    real = features.embed
    monkeypatch.setattr(features, "embed", lambda m, x, **kw: calls.append(len(x)) or real(m, x, **kw))
    again = features.cached_embed(model, images[[4, 0]], [samples[4], samples[0]], cache_dir=tmp_path / "c",
                                  key_info=key)
    assert calls == [] and torch.equal(again, first[[4, 0]])  # read back by path, in the asked order
    more = features.cached_embed(model, images, samples + _samples(tmp_path / "x", 1)[:0], cache_dir=tmp_path / "c",
                                 key_info=key | {"augment": "seed"})
    assert calls == [5] and more.shape == first.shape  # another key is another store


def test_cache_key_names_everything_but_the_images():
    base = dict(model_info={"a": 1}, image_size=224, augment="seed", views=8, seed=0, precision="32")
    assert features.cache_key(**base) == features.cache_key(**base)
    assert len({features.cache_key(**(base | {k: v})) for k, v in
                [("image_size", 128), ("augment", "none"), ("views", 4), ("seed", 1), ("precision", "bf16")]}) == 5


def test_feature_dataset_draws_a_view():
    feats = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    ds = features.FeatureDataset(feats, [0, 1])
    x, y = ds[1]
    assert len(ds) == 2 and y == 1 and any(torch.equal(x, feats[1, v]) for v in range(3))


def test_onnx_runtime_embedding_agrees_with_pytorch():
    import numpy as np

    from pneumoscan.modeling import models

    model, _ = models.build("mobilenet_v2", weights="none", unfreeze_blocks=0)
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    assert features.onnx_embedder(model, 64) is not None
    fast = features.embed(model, images, batch_size=2)
    slow = features.embed(model, images, engine="torch")
    assert fast.shape == slow.shape == (5, 1280)
    assert torch.allclose(fast, slow, rtol=1e-3, atol=1e-4)
