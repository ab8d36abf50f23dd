"""DDP on CPU: two gloo processes under torchrun must train the same model as one process.

The comparison is exact by construction. Each rank gets half of the global batch and DDP averages
the two gradients, which equals the single process's gradient on the whole batch when the halves
are equally sized; one batch per epoch (batch = the whole training set) makes the sample order
irrelevant, so after a few Adam steps the weights agree to float rounding. A rank that saw all
the data (no DistributedSampler) would take two steps per epoch and end far away. The head has no
BatchNorm, because PyTorch's SyncBatchNorm runs only on GPUs (train.fit turns it on there), and on
CPU each rank would normalise by its own half batch; and no dropout, whose masks differ per rank.
A random-init resnet18 is the backbone because random-init MobileNetV2 features are all ~0.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import make_dataset
from pneumoscan.modeling import models
from pneumoscan.training import train
from pneumoscan.core.config import RunConfig

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

N_TRAIN = 24  # 12 NORMAL + 12 PNEUMONIA; even, so the two ranks' halves are equal
EPOCHS = 3

SCRIPT = '''
import json, sys
from pathlib import Path
import lightning as L
import yaml
from pneumoscan.training import train
from pneumoscan.core.config import RunConfig

class RecordSampler(L.Callback):
    """What each rank iterates over in each epoch."""
    def __init__(self):
        self.epochs = []
    def on_train_epoch_start(self, trainer, pl_module):
        s = trainer.train_dataloader.sampler
        self.epochs.append({"sampler": type(s).__name__, "shuffle": getattr(s, "shuffle", None),
                            "indices": [int(i) for i in s]})

out = Path(sys.argv[2])
result = {}
for name, overrides in (("fast", {}), ("slow", {"feature_cache": False, "epochs": 1})):
    config = RunConfig.from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
    config.name = name
    for key, value in overrides.items():
        setattr(config.train, key, value)
    recorder = RecordSampler()
    run_dir = train.fit(config, callbacks=[recorder])
    result[name] = {"run_dir": str(Path(run_dir).resolve()), "epochs": recorder.epochs}
rank = int(__import__("os").environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps(result))
'''


def config_for(root: Path, out: Path, *, batch_size: int, devices: int, strategy: str) -> RunConfig:
    config = RunConfig()
    config.data.root = str(root)
    config.data.image_size = 32
    config.data.min_val_images = 1  # use the given val/ split as it is
    config.data.augment = "none"  # one view per image: no random view draws that differ per rank
    config.data.batch_size = batch_size
    config.model.backbone = "resnet18"
    config.model.backbone_weights = "none"
    config.model.unfreeze_blocks = 0  # the frozen fast path: ranks share one feature store
    config.model.head = "64,32"
    config.train.precision = "32"
    config.train.epochs = EPOCHS
    config.train.lr = 1e-2
    config.train.devices = devices
    config.train.strategy = strategy
    config.train.cache_dir = str(out.parent / "cache")  # shared: the ranks read the reference's features
    config.out_dir = str(out)
    return config


def head_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model.head."): v for k, v in state.items() if k.startswith("model.head.")}


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model_as_one(tmp_path):
    root = make_dataset(tmp_path / "chest_xray", {"train": (12, 12), "val": (6, 6)}, size=32)

    single_config = config_for(root, tmp_path / "single", batch_size=N_TRAIN, devices=1, strategy="auto")
    single_config.name = "single"
    single = train.fit(single_config)

    ddp_config = config_for(root, tmp_path / "ddp", batch_size=N_TRAIN // 2, devices=2, strategy="ddp")
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp_config.to_dict()))
    (tmp_path / "ddp_script.py").write_text(SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "ddp_script.py"), str(tmp_path / "ddp.yaml"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # one run folder per run, written by rank 0, and every rank was told where it is
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")) == ["fast", "slow"]
    for name in ("fast", "slow"):
        assert ranks[0][name]["run_dir"] == ranks[1][name]["run_dir"] == str((tmp_path / "ddp" / name).resolve())
        # both the feature loaders and the image loaders are sharded: disjoint halves covering the data
        for epoch in range(len(ranks[0][name]["epochs"])):
            shards = [r[name]["epochs"][epoch] for r in ranks]
            assert all(s["sampler"] == "DistributedSampler" and s["shuffle"] for s in shards)
            assert sorted(shards[0]["indices"] + shards[1]["indices"]) == list(range(N_TRAIN))
    orders = [e["indices"] for e in ranks[0]["fast"]["epochs"]]
    assert len(orders) == EPOCHS and orders[0] != orders[1]  # reshuffled each epoch

    fast = tmp_path / "ddp" / "fast"
    for name in ("model.pt", "history.csv", "validation/metrics.json", "checkpoints/last.ckpt"):
        assert (fast / name).is_file(), name

    # the same weights as the single process, although they moved well away from their init
    L.seed_everything(single_config.train.seed, verbose=False)
    init, _ = models.build("resnet18", weights="none", head="64,32")
    ref, got = head_weights(single), head_weights(fast)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.allclose(got[key], ref[key], atol=1e-4), key
    moved = max((ref[k] - v).abs().max().item() for k, v in init.head.state_dict().items())
    assert moved > 1e-2

    # epoch metrics are reduced over both ranks: the history matches the single process's
    for mine, theirs in zip(history(fast), history(single), strict=True):
        for column in ("train_loss", "train_auc", "train_accuracy", "val_loss", "val_auc", "val_accuracy"):
            assert float(mine[column]) == pytest.approx(float(theirs[column]), abs=1e-4), column

    # evaluation ran once, over all validation images, with the same result
    val_single = json.loads((single / "validation" / "metrics.json").read_text())
    val_ddp = json.loads((fast / "validation" / "metrics.json").read_text())
    assert val_ddp["n"] == val_single["n"] == 12
    for key in ("roc_auc", "loss", "threshold", "accuracy"):
        assert val_ddp[key] == pytest.approx(val_single[key], abs=1e-3), key
