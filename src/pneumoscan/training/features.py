"""Cached backbone features: the fast path for training with a frozen backbone.

With the backbone frozen (and in eval mode) its output for a given input never changes, so
running it every epoch is wasted work: 30 epochs of the seed study spend ~99% of their time there.
Instead each training image is embedded once per augmented view (``views`` of them, default 8),
validation and test images once without augmentation, and the head trains on these vectors —
an epoch then takes about a second. Each epoch draws one view per image at random, which stands
in for fresh augmentation. The store lives on disk, named by the backbone, its weights, image size,
augmentation, views and seed, and indexed by image path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumoscan.io import data
from pneumoscan.modeling import models
from pneumoscan.core.files import atomic_path

log = logging.getLogger(__name__)


def cache_key(*, model_info: dict, image_size: int, augment: str, views: int, seed: int, precision: str) -> str:
    """Names one feature store: everything except which images, which the store indexes by path."""
    blob = json.dumps({"model": model_info, "size": image_size, "augment": augment, "views": views,
                       "seed": seed, "precision": precision}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _Embedding(torch.nn.Module):
    def __init__(self, model: models.Classifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def onnx_embedder(model: models.Classifier, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """``model.embed`` as an ONNX Runtime session on float32 (N, 1, size, size), or None where it
    cannot be exported. On a CPU it runs MobileNetV2 about 5x faster than eager PyTorch (250 against
    50 images/s on 2 cores), and embedding is most of the fast path's and the OOD fit's time."""
    import io
    import warnings

    try:
        import onnx
        import onnxruntime as ort

        from pneumoscan.inference import onnx_graph
        from pneumoscan.inference.engines import default_threads

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on the padding hooks' constant shapes
            torch.onnx.export(_Embedding(model).eval(), (torch.zeros(2, 1, size, size),), buf, dynamo=False,
                              opset_version=17, input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
        proto = onnx_graph.simplify(onnx.load_from_string(buf.getvalue()), "image", size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # an architecture the exporter cannot trace: PyTorch does the work
        log.debug("embedding with PyTorch: ONNX export failed (%s: %s)", type(exc).__name__, exc)
        return None
    return lambda x: session.run(None, {"image": x})[0]


def embedding_runner(model: models.Classifier | models.Ensemble, size: int, *, bf16: bool = False,
                     engine: str = "auto") -> Callable[[np.ndarray], np.ndarray] | None:
    """What ``embed`` runs on: an ONNX Runtime session for a CPU-resident fp32 model under
    ``engine="auto"``, else None (PyTorch). Build it once for a model whose weights no longer
    change and pass it as ``runner``: each build is an export."""
    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    return onnx_embedder(model.eval(), size) if engine == "auto" and on_cpu and not bf16 else None


def embed(model: models.Classifier | models.Ensemble, images: np.ndarray, *, transform=None,
          seeds: Sequence[int] | None = None,
          batch_size: int = 64, bf16: bool = False, progress: Callable[[int], None] | None = None,
          engine: str = "auto", runner: Callable[[np.ndarray], np.ndarray] | None = None) -> torch.Tensor:
    """Pooled backbone features (N, D) float32.

    ``engine``: "auto" uses ONNX Runtime on a CPU-resident model in fp32 (``runner``, else one
    ``embedding_runner`` builds; it agrees with PyTorch to ~1e-5, below the store's fp16), else
    PyTorch, with bf16 autocast + channels-last where the CPU has bf16. ``transform`` (a batched augmentation such as
    transforms.SeedAugment) gets one seed per image, so a view is the same whichever images it is
    batched with.
    """
    model.eval()
    run = runner if runner is not None else (
        embedding_runner(model, images.shape[-1], bf16=bf16, engine=engine) if len(images) else None)
    if run is not None:
        seeds = list(seeds) if seeds is not None else list(range(len(images)))
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).unsqueeze(1)
            if transform is not None:
                x = transform(x, seeds=seeds[i:i + batch_size])
            out.append(torch.from_numpy(run(x.float().div_(255).numpy())))
            if progress:
                progress(min(i + batch_size, len(images)))
        return torch.cat(out)
    model.to(memory_format=torch.channels_last)  # outside inference mode: parameters stay ordinary tensors
    seeds = list(seeds) if seeds is not None else list(range(len(images)))
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).unsqueeze(1)
            if transform is not None:
                x = transform(x, seeds=seeds[i:i + batch_size])
            x = x.float().div_(255).contiguous(memory_format=torch.channels_last)
            out.append(model.embed(x).float())
            if progress:
                progress(min(i + batch_size, len(images)))
    model.to(memory_format=torch.contiguous_format)
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim)


def cached_embed(model: models.Classifier, images: np.ndarray, samples: Sequence[data.Sample], *,
                 cache_dir: str | Path | None, key_info: dict, transform=None, views: int = 1, seed: int = 0,
                 bf16: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, views, D) features; images already in the store (by resolved path) are not embedded again,
    so cross-validation folds and runs that differ only in their head share the work."""
    key = cache_key(views=views, seed=seed, precision="bf16" if bf16 else "32", **key_info)
    path = Path(cache_dir) / f"features-{key}.pt" if cache_dir else None
    store = {"paths": [], "features": None}
    if path and path.is_file():
        store = torch.load(path, map_location="cpu", weights_only=True)
    index = {p: i for i, p in enumerate(store["paths"])}
    names = [str(Path(s.path).resolve()) for s in samples]
    missing = [i for i, n in enumerate(names) if n not in index]
    if len(missing) < len(names):
        log.info("features of %d/%d images from cache %s", len(names) - len(missing), len(names), path)
    if missing:
        per_view = []
        runner = embedding_runner(model, images.shape[-1], bf16=bf16)  # one export for every view
        for v in range(views):
            seeds = [zlib.crc32(f"{names[i]}|{v}|{seed}".encode()) for i in missing]
            per_view.append(embed(model, images[missing], transform=transform, seeds=seeds, bf16=bf16, runner=runner,
                                  progress=(lambda d, v=v: progress(v * len(missing) + d)) if progress else None))
        new = torch.stack(per_view, dim=1).half()  # fp16 halves the store; features are bf16-exact anyway
        for i in missing:
            index[names[i]] = len(index)
        store = {"paths": store["paths"] + [names[i] for i in missing],
                 "features": new if store["features"] is None else torch.cat([store["features"], new])}
        if path:
            with atomic_path(path) as tmp:
                torch.save(store, tmp)
    return store["features"][[index[n] for n in names]].float()


class FeatureDataset(Dataset):
    """One random view per image per access, i.e. a fresh draw each epoch."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]):
        self.features = features
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.features.shape[1], ())) if self.features.shape[1] > 1 else 0
        return self.features[i, v], self.labels[i]
