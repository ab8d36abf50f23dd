"""Experiment grids: named variants × seeds, each a training run, tracked in MLflow and compared.

The seed study compared ten heads trained once each; a difference of a point of ROC-AUC between
two heads is about what a different seed alone produces. Here every variant is trained on several
seeds and reported as mean ± sd over them, so a difference can be read against the spread. A grid
file (YAML)::

    base:                    # a RunConfig, as in a run's config.yaml: data / model / train sections
      model: {backbone_weights: ../shared/weights/mobilenet_v2_imagenet.pth}
    seeds: [42, 43, 44]      # optional; default: the base config's seed
    runs:                    # each: a name plus overrides of base, section by section
      - name: exp1
        model: {head: exp1}

Relative paths in it are relative to the working directory, as on the command line. Runs go to
OUT/<name>-s<seed>/ (ordinary run folders); they share one feature cache, OUT/.feature-cache/
unless base sets train.cache_dir, so variants that differ only in their head embed the images once
per seed.

Tracking: each run is an MLflow run ``<name>-s<seed>`` in an experiment named after the grid file,
with the epoch metrics (Lightning's MLFlowLogger), the flattened config as params (``model.head``),
the final ``validation/*`` and ``test/*`` metrics, seconds per epoch and of feature extraction,
and the small files of its run folder as artifacts (not checkpoints or model.pt). The default store
is ``sqlite:///OUT/mlflow.db`` with artifacts in OUT/mlartifacts/: a local database that needs no
server (MLflow 3 refuses the old ``./mlruns`` file store unless MLFLOW_ALLOW_FILE_STORE=true);
MLFLOW_TRACKING_URI or --tracking-uri point elsewhere, e.g. a team's server. To browse a local
store: ``pip install mlflow`` (the UI is not in mlflow-skinny), then
``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pneumoscan.modeling import backbones, heads
from pneumoscan.evaluation import compare
from pneumoscan.core import calibration
from pneumoscan.training import loaders, train
from pneumoscan.core.config import RunConfig, apply_overrides, merge
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import write_csv, write_text

log = logging.getLogger(__name__)

INSTALL = "pip install 'pneumoscan[tracking]'  (i.e. mlflow-skinny, sqlalchemy, alembic)"
GRID_KEYS = ("base", "seeds", "runs")
# (split, metric) columns of the comparison; the test split only where the data has one
SPLIT_METRICS = ("roc_auc", "accuracy", "recall", "specificity", "f1")
TIMINGS = ("seconds_per_epoch", "feature_seconds")
LOGGED_METRICS = ("roc_auc", "pr_auc", "accuracy", "precision", "recall", "specificity", "f1", "loss", "brier", "ece")
ARTIFACTS = ("config.yaml", "history.csv", "curves.png", "validation/metrics.json", "test/metrics.json")
_LABEL = {"roc_auc": "ROC-AUC", "accuracy": "acc", "recall": "sens", "specificity": "spec", "f1": "F1",
          "seconds_per_epoch": "s/epoch", "feature_seconds": "feature s"}


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def plan(grid_path: str | Path, *, seeds: int | None = None, data_root: str | None = None,
         out_dir: str | Path | None = None) -> tuple[Path, list[Run]]:
    """The output folder and every (variant, seed) run of a grid file, all validated before any trains.

    ``seeds`` = N replaces the grid's seeds with N consecutive ones from its first (or the base seed).
    """
    grid_path = Path(grid_path)
    if not grid_path.is_file():
        raise UserError(f"grid file not found: {grid_path}")
    try:
        grid = yaml.safe_load(grid_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{grid_path}: not valid YAML ({exc})") from None
    if not isinstance(grid, dict) or set(grid) - set(GRID_KEYS):
        raise UserError(f"{grid_path}: top-level keys must be among {', '.join(GRID_KEYS)}")
    base = grid.get("base") or {}
    entries = grid.get("runs") or []
    if not isinstance(base, dict) or not isinstance(entries, list) or not entries:
        raise UserError(f"{grid_path}: needs 'runs:', a list of {{name: ..., <section>: {{overrides}}}}")
    try:
        base_config = RunConfig.from_dict(base)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{grid_path}: base: {exc}") from None

    grid_seeds = grid.get("seeds") or [base_config.train.seed]
    if not isinstance(grid_seeds, list) or not all(isinstance(s, int) for s in grid_seeds):
        raise UserError(f"{grid_path}: seeds must be a list of integers")
    if seeds is not None:
        if seeds < 1:
            raise UserError("--seeds must be at least 1")
        grid_seeds = [grid_seeds[0] + i for i in range(seeds)]
    out = Path(out_dir) if out_dir else Path(base_config.out_dir) / grid_path.stem

    variants: dict[str, dict] = {}
    for entry in entries:
        entry = dict(entry) if isinstance(entry, dict) else {}
        name = str(entry.pop("name", "") or "")
        if not name or "/" in name or name.startswith(".") or name in variants:
            raise UserError(f"{grid_path}: every run needs a unique 'name' usable as a folder name (got {name!r})")
        variants[name] = merge(base, entry)
    runs = []
    for seed in grid_seeds:  # seed-major: an interrupted grid still has every variant on its first seeds
        for name, merged in variants.items():
            try:
                config = RunConfig.from_dict(merged)
                config = apply_overrides(config, {
                    "train.seed": seed, "out_dir": str(out),
                    "train.cache_dir": config.train.cache_dir or str(out / ".feature-cache"),
                    **({"data.root": data_root} if data_root else {})})
            except (ValueError, TypeError) as exc:
                raise UserError(f"{grid_path}: run {name}: {exc}") from None
            run = Run(name, seed, config)
            config.name = run.name
            runs.append(run)
    _validate(runs)
    return out, runs


def _validate(runs: list[Run]) -> None:
    """Mistakes that would otherwise surface hours in, at the run that has them."""
    checked_weights = set()
    for run in runs:
        dc, mc, tc = run.config.data, run.config.model, run.config.train
        where = f"run {run.variant}"
        if not dc.root:
            raise UserError("no data: pass --data DIR or set base: data: root: in the grid file")
        if not Path(dc.root).is_dir():
            raise UserError(f"data folder not found: {dc.root}")
        if tc.members:  # train.fit trains one model: the members would be silently ignored
            raise UserError(f"{where}: sets train.members ({tc.members}); a grid run is one model: give each "
                            "member its own run, or cross-validate the ensemble with 'pneumoscan cv'")
        if tc.devices != 1 or tc.num_nodes != 1:
            raise UserError(f"{where}: experiments train one process per run; scale out a single run with "
                            "'pneumoscan train --devices N --strategy ddp' instead")
        try:
            backbones.backbone(mc.backbone)
            heads.build_head(mc.head, 8)
            calibration.choose_threshold([0, 1], [0.2, 0.8], tc.threshold)
            key = (mc.backbone, mc.backbone_weights, mc.weights_normalization)
            if key not in checked_weights:
                backbones.resolve_weights(*key)
                checked_weights.add(key)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _tracking_client(uri: str, experiment: str):
    """An MLflow client with the experiment in place; a local sqlite store keeps artifacts beside it."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise UserError(f"experiment tracking needs MLflow: {INSTALL}") from None
    artifacts = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.resolve().parent / "mlartifacts").as_uri()
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            client.create_experiment(experiment, artifact_location=artifacts)
        elif found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
    except MlflowException as exc:
        missing_db = uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None
        hint = f"; a local sqlite store needs {INSTALL}" if missing_db else ""
        raise UserError(f"MLflow tracking store {uri}: {str(exc.message).splitlines()[0]}{hint}") from None
    return client


def run_grid(grid_path: str | Path, *, seeds: int | None = None, tracking_uri: str | None = None,
             out_dir: str | Path | None = None, data_root: str | None = None,
             progress: loaders.Progress | None = None) -> Path:
    """Train every run of the grid, track each in MLflow, write the comparison; returns the output folder."""
    from lightning.pytorch.loggers import MLFlowLogger

    out, runs = plan(grid_path, seeds=seeds, data_root=data_root, out_dir=out_dir)
    uri = tracking_uri or default_tracking_uri(out)
    experiment = Path(grid_path).stem
    client = _tracking_client(uri, experiment)
    write_text(out / "grid.yaml", Path(grid_path).read_text())  # the grid as run, beside its results
    log.info("%d runs (%d variants × %d seeds) into %s; MLflow %s, experiment %s", len(runs),
             len({r.variant for r in runs}), len({r.seed for r in runs}), out, uri, experiment)

    rows = []
    for i, run in enumerate(runs, start=1):
        log.info("run %d/%d: %s", i, len(runs), run.name)
        logger = MLFlowLogger(experiment_name=experiment, run_name=run.name, tracking_uri=uri,
                              tags={"variant": run.variant, "seed": str(run.seed), "grid": str(grid_path)})
        logger.log_hyperparams(_flatten(run.config.to_dict()))
        try:
            result = train.fit_result(run.config, loggers=[logger], progress=progress)
        except BaseException:
            client.set_terminated(logger.run_id, "FAILED")
            raise
        run_dir = result.run_dir
        # from what the run measured, in memory: nothing is parsed back from its files
        row = compare.run_row(run_dir, meta=result.meta, evaluations=result.evaluations)
        row["feature_seconds"] = result.meta.training.feature_seconds
        row |= {"variant": run.variant, "seed": run.seed, "mlflow_run_id": logger.run_id}
        _log_results(client, logger.run_id, run_dir, row)
        rows.append(row)

    summary = summarize(rows)
    splits = ["validation"] + (["test"] if any(r.get("test_roc_auc") is not None for r in rows) else [])
    write_text(out / "comparison.md", markdown(summary, splits, experiment=experiment, uri=uri,
                                               seeds=sorted({r.seed for r in runs})))
    columns = ["run", "seeds", "n"] + [f"{c}_{s}" for c in _columns(splits) for s in ("mean", "sd")]
    write_csv(out / "comparison.csv", columns,
              [[_csv(row.get(c)) for c in columns] for row in summary])
    per_run = ["variant", "seed", "run", "path", "mlflow_run_id", *_columns(["validation", "test"])]
    write_csv(out / "runs.csv", per_run, [[_csv(r.get(c)) for c in per_run] for r in rows])
    log.info("comparison: %s", out / "comparison.md")
    return out


def _log_results(client, run_id: str, run_dir: Path, row: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {f"{split}/{key}": row.get(f"{split}_{key}") for split in compare.SPLITS for key in LOGGED_METRICS}
    values |= {f"training/{key}": row.get(key) for key in (*TIMINGS, "epochs_run")}
    batch = [Metric(key, float(v), now, 0) for key, v in values.items() if isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=batch)
    client.set_tag(run_id, "run_dir", str(Path(run_dir).resolve()))
    for rel in ARTIFACTS:
        if (run_dir / rel).is_file():
            client.log_artifact(run_id, str(run_dir / rel), artifact_path=str(Path(rel).parent) if "/" in rel else None)


def _columns(splits: list[str]) -> list[str]:
    return [f"{split}_{key}" for split in splits for key in SPLIT_METRICS] + list(TIMINGS)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarize(rows: list[dict]) -> list[dict]:
    """One row per variant (grid order kept among ties): ``<column>_mean`` and ``<column>_sd``
    (sample sd, ddof 1; nan with one seed) over its seeds; best mean validation ROC-AUC first."""
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    summary = []
    for variant, group in by_variant.items():
        out: dict[str, Any] = {"run": variant, "seeds": " ".join(str(r["seed"]) for r in group), "n": len(group)}
        for column in _columns(["validation", "test"]):
            values = np.array([_number(r.get(column)) for r in group])
            values = values[~np.isnan(values)]
            out[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            out[f"{column}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        summary.append(out)
    best_first = lambda r: -r["validation_roc_auc_mean"] if not math.isnan(r["validation_roc_auc_mean"]) else math.inf  # noqa: E731
    return sorted(summary, key=best_first)


def _cell(row: dict, column: str, digits: int) -> str:
    mean, sd = row[f"{column}_mean"], row[f"{column}_sd"]
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def markdown(summary: list[dict], splits: list[str], *, experiment: str, uri: str, seeds: list[int]) -> str:
    metric_columns = [f"{split}_{key}" for split in splits for key in SPLIT_METRICS]
    header = ["#", "run"] + [f"{'val' if c.startswith('validation') else 'test'} {_LABEL[c.split('_', 1)[1]]}"
                             for c in metric_columns] + [_LABEL[t] for t in TIMINGS]
    lines = [f"# Experiments: {experiment}", "",
             f"Mean ± sd over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); "
             "sorted by mean validation ROC-AUC, the number a variant may be chosen on (test columns are for "
             f"reading, not picking). MLflow: {uri}, experiment '{experiment}'.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(summary, start=1):
        cells = [str(i), row["run"]] + [_cell(row, c, 3) for c in metric_columns] + [_cell(row, t, 1) for t in TIMINGS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
