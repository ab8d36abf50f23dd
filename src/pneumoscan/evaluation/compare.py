"""Several training runs side by side: what each was configured with and how it scored.

The seed study's ten head experiments become one command: ``pneumoscan compare runs/*``. Rows are
sorted by validation ROC-AUC, the number the runs may legitimately be chosen on; test metrics are
shown for reading, not for picking (choosing the best run by test score would make that score
optimistic). Every metric comes with its 95% bootstrap interval, so a difference smaller than the
intervals' overlap is visibly not a difference.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping

from pneumoscan.evaluation.results import Evaluation
from pneumoscan.modeling import artifact
from pneumoscan.modeling.artifact import ModelMeta
from pneumoscan.core.errors import UserError
from pneumoscan.core.files import write_csv, write_text

log = logging.getLogger(__name__)

SPLITS = ("validation", "test")  # sub-folders of a run folder with a metrics.json
METRICS = ("roc_auc", "accuracy", "recall", "specificity", "f1", "pr_auc")
CALIBRATION = ("brier", "ece")  # point values only: the bootstrap covers METRICS
CONFIG_COLUMNS = ("backbone", "head", "augment", "unfreeze_blocks", "weights", "epochs_run", "seconds_per_epoch")
_SHORT = {"roc_auc": "ROC-AUC", "accuracy": "acc", "recall": "sens", "specificity": "spec", "f1": "F1",
          "pr_auc": "PR-AUC", "brier": "Brier", "ece": "ECE"}
_MARKDOWN_METRICS = {"validation": ("roc_auc", "recall", "specificity"),
                     "test": ("roc_auc", "accuracy", "recall", "specificity", "ece")}


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding a model.pt); a folder of run folders is searched one level down."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"not a run folder: {p}")
        if (p / "model.pt").is_file():
            runs.append(p)
            continue
        inner = sorted(q for q in p.iterdir() if (q / "model.pt").is_file())
        if inner:
            runs += inner
        else:
            log.warning("skipped %s: no model.pt in it or in its sub-folders (unfinished run?)", p)
    if not runs:
        raise UserError("no run folders with a model.pt among the given paths")
    return list(dict.fromkeys(runs))


def _recipe_columns(architecture: str, head: str, config: dict, backbone_weights: dict) -> dict:
    model_cfg, data_cfg = config.get("model", {}), config.get("data", {})
    weights = str(model_cfg.get("backbone_weights", backbone_weights.get("source", "")))
    return {"backbone": architecture, "head": head, "augment": data_cfg.get("augment"),
            "unfreeze_blocks": model_cfg.get("unfreeze_blocks"),
            "weights": Path(weights).name if weights not in ("imagenet", "none") else weights}


def run_row(run: Path, *, meta: ModelMeta | None = None, evaluations: Mapping[str, Evaluation] | None = None) -> dict:
    """One run as a flat dict: config columns, then ``<split>_<metric>`` with ``_lo`` / ``_hi``.
    An ensemble's config columns list its members' values joined by "+", in member order.

    A caller that holds the run's ``meta`` and ``evaluations`` (by split) in memory, as an
    experiment grid does right after training, passes them; else they are read from the folder."""
    meta = meta or artifact.read_meta(run / "model.pt")
    if meta.is_ensemble:
        per_member = [_recipe_columns(m.architecture, m.head, m.config, m.backbone_weights) for m in meta.members]
        recipe = {key: "+".join(str(columns[key]) for columns in per_member) for key in per_member[0]}
    else:
        recipe = _recipe_columns(meta.architecture, meta.head, meta.config, meta.backbone_weights)
    row: dict = {"run": run.name, "path": str(run), **recipe, "epochs_run": meta.training.epochs_run,
                 "seconds_per_epoch": meta.training.seconds_per_epoch}
    for split in SPLITS:
        if evaluations is None:
            result = Evaluation.read_metrics(run / split)
        else:
            result = evaluations[split].to_dict() if split in evaluations else {}
        ci = result.get("ci95", {})
        for key in METRICS:
            row[f"{split}_{key}"] = result.get(key)
            lo, hi = ci.get(key, (None, None))
            row[f"{split}_{key}_lo"], row[f"{split}_{key}_hi"] = lo, hi
        for key in CALIBRATION:
            row[f"{split}_{key}"] = result.get(key)
    return row


def _sort_key(row: dict) -> float:
    value = row.get("validation_roc_auc")
    return -value if isinstance(value, (int, float)) and not math.isnan(value) else math.inf


def collect(paths: Iterable[str | Path]) -> list[dict]:
    """Rows for every run found, best validation ROC-AUC first (runs without one last)."""
    return sorted((run_row(r) for r in find_runs(paths)), key=_sort_key)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, digits: int = 3) -> str:
    if _missing(value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_ci(row: dict, key: str) -> str:
    value, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if _missing(value) or _missing(lo) or _missing(hi):  # no interval (e.g. one class in a bootstrap)
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(lo)}–{_fmt(hi)})"


def markdown(rows: list[dict]) -> str:
    """A GitHub-flavoured table; metrics read ``value (95% CI low–high)``."""
    header = ["#", "run", *CONFIG_COLUMNS]
    metric_keys = [(split, key) for split, keys in _MARKDOWN_METRICS.items() for key in keys]
    header += [f"{'val' if split == 'validation' else split} {_SHORT[key]}" for split, key in metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(rows, start=1):
        cells = [str(i), row["run"], *(_fmt(row.get(c), 2) for c in CONFIG_COLUMNS)]
        cells += [_with_ci(row, f"{split}_{key}") for split, key in metric_keys]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n\nSorted by validation ROC-AUC; values are point estimate (95% bootstrap CI).\n"


def compare(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> str:
    """The markdown table; with ``out_dir`` also written as compare.md and compare.csv (all columns)."""
    rows = collect(paths)
    table = markdown(rows)
    if out_dir is not None:
        out = Path(out_dir)
        write_text(out / "compare.md", table)
        columns = list(rows[0])
        write_csv(out / "compare.csv", columns, [["" if r.get(c) is None else r.get(c) for c in columns] for r in rows])
        log.debug("wrote %s and %s", out / "compare.md", out / "compare.csv")
    return table
