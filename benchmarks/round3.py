"""The shift protocol's third round (issue 21): end-to-end EfficientNet-Lite0, threshold rules and
an adult-normal specificity probe, judged by the rule written before the runs (robustness.py's
docstring, "Third round"; benchmarks/robustness.md).

    python benchmarks/robustness.py run RECIPE --fold IM|NORMAL2 --no-variants --out OUT   # training
    PYTHONPATH=src python benchmarks/round3.py adult --out OUT   # the fold models' adult-normal logits
    PYTHONPATH=src python benchmarks/round3.py table --out OUT   # -> markdown (robustness.md, third round)

Why the adult probe: the pneumonia classifier never sees an adult film, and must not (no adult
pneumonia films exist here: it would learn "adult => normal"). Its specificity on adult normals at
its own threshold says whether its normals stay normal under a population shift, which LOCO (two
series of the same archive) barely tests. The films are the *report* part of adult_cxr_normal
under the input checks' fixed rule (benchmarks/chest_data.py: sha256 bucket 8-9 of the relative
path), so nothing fitted anywhere ever saw them; they are scored by the classifier alone, without
the input gate that would hold most of them back.

Why post-hoc threshold rules: the threshold is a function of the validation logits, so every rule
can be judged on the same trained folds, with no retraining; core/rules.py gets a new rule only if
this round's rule picks it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chest_data  # noqa: E402
import robustness  # noqa: E402

from pneumoscan.core import calibration, metrics  # noqa: E402

SERIES = robustness.SERIES
MEMBERS = ("frozen-acquisition-mixup", "seed-study-lite0", "lp-ft-lite0-acquisition")
_LPFT = "lp-ft-lite0-acquisition"
# ensembles of scores (no extra training), led by the first member's threshold rule; the seeds'
# rows exist only where benchmarks/round3_gpu.sh trained them (run --suffix @seedN)
ENSEMBLES = {"frozen-acquisition-mixup+seed-study-lite0": ("frozen-acquisition-mixup", "seed-study-lite0"),
             "frozen-acquisition-mixup+lp-ft-lite0-acquisition": ("frozen-acquisition-mixup", _LPFT),
             f"{_LPFT}(3 seeds)": (_LPFT, f"{_LPFT}@seed1", f"{_LPFT}@seed2"),
             f"frozen-acquisition-mixup+{_LPFT}(3 seeds)": ("frozen-acquisition-mixup", _LPFT, f"{_LPFT}@seed1",
                                                            f"{_LPFT}@seed2")}
DEFAULT = "frozen-acquisition-mixup+seed-study-lite0"  # today's RECIPES["default"]
SEED_STUDY_ID_AUC = 0.989  # second round's mean ID ROC-AUC of seed-study (not re-run)
MARGIN = 0.01  # "beats the default by more than 0.01 on both folds"
RULES = ("as trained", "youden", "gap-mid", "sens-floor-0.95")


# ------------------------------------------------------------------ the adult-normal probe

def adult_images(out: Path) -> np.ndarray:
    """The report part (sha256 buckets 8-9) of adult_cxr_normal, decoded as every film is, cached."""
    cache = out / "adult_report.npy"
    if cache.is_file():
        return np.load(cache)
    from pneumoscan.io import imaging

    base = chest_data.DATA / "adult_cxr_normal"
    files = [rel for rel, _, part in chest_data.folder_files(base, 3) if part == "report"]
    pixels = np.stack([imaging.read(base / rel, 224).pixels for rel in files])
    np.save(cache, pixels)
    return pixels


def adult_logits(out: Path) -> None:
    """Calibrated logits of every finished fold model on the adult report part (``adult/NAME-FOLD.npy``)."""
    from pneumoscan.inference.loading import load_engine

    images = adult_images(out)
    for model in sorted((out / "runs").glob("*/model.pt")):
        target = out / "adult" / f"{model.parent.name}.npy"
        if not target.is_file() and (out / "scores" / f"{model.parent.name}.npz").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, load_engine(model).predict_logits(images, 64))


# ------------------------------------------------------------------ scores and rules

def fold_scores(out: Path) -> dict[str, dict[str, dict]]:
    """recipe -> fold -> saved logits (with "adult" when probed), for every finished fold; pairs
    are ensembled on the folds both members finished."""
    scores: dict[str, dict[str, dict]] = {}
    for f in sorted((out / "scores").glob("*.npz")):
        recipe, fold = f.stem.rsplit("-", 1)
        z = dict(np.load(f))
        if (adult := out / "adult" / f"{f.stem}.npy").is_file():
            z["adult"] = np.load(adult)
        scores.setdefault(recipe, {})[fold] = z
    for name, members in ENSEMBLES.items():
        folds = [f for f in SERIES if all(f in scores.get(m, {}) for m in members)]
        if folds:
            scores[name] = {f: robustness.ensemble([scores[m][f] for m in members], robustness.rule_of(members[0]))
                            for f in folds}
    return scores


def gap_mid(z: np.ndarray, y: np.ndarray) -> float:
    """The middle, in logit space, of the 95th percentile of NORMAL and the 5th of PNEUMONIA."""
    return float(metrics.sigmoid((np.percentile(z[y == 0], 95) + np.percentile(z[y == 1], 5)) / 2))


def threshold(z: dict, rule: str) -> float:
    """A probability cut-off fitted on the fold's validation logits (or the model's own)."""
    if rule == "as trained":
        return float(z["threshold"])
    y, p = z["val_y"], metrics.sigmoid(z["val"].astype(np.float64))
    if rule == "gap-mid":
        return gap_mid(z["val"].astype(np.float64), y)
    return calibration.choose_threshold(y, p, {"youden": "youden", "sens-floor-0.95": "sensitivity:0.95"}[rule])


_RESULTS: dict[tuple[int, str], dict] = {}  # every table asks again; scoring 26 shifts is not free


def fold_result(z: dict, rule: str = "as trained") -> dict:
    """The protocol's numbers of one fold at ``rule``'s threshold, plus the adult probe."""
    key = (id(z), rule)
    if key not in _RESULTS:
        _RESULTS[key] = _fold_result(z, rule)
    return _RESULTS[key]


def _fold_result(z: dict, rule: str) -> dict:
    thr = threshold(z, rule)
    e = robustness.evaluate_scores(z | {"threshold": np.array(thr)})
    e["score"] = (e["loco"]["accuracy"] + e["shift"]["worst_specificity_at_sens95"]) / 2
    if "adult" in z:
        normal = int((metrics.sigmoid(z["adult"].astype(np.float64)) < thr).sum())
        e["adult"] = (normal, int(len(z["adult"])))
    return e


def adult_cell(results: list[dict]) -> str:
    """Specificity on the adult normals per fold model, Wilson 95% CI (the same films each time)."""
    cells = []
    for e in results:
        if "adult" not in e:
            cells.append("n/a")
            continue
        k, n = e["adult"]
        lo, hi = metrics.proportion_ci(k, n)
        cells.append(f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]")
    return " / ".join(cells)


# ------------------------------------------------------------------ the verdicts

def beats(scores: dict, name: str, base: str, rule: str = "as trained", base_rule: str = "as trained") -> bool:
    """More than MARGIN above ``base`` on both folds, both finished."""
    if not all(f in scores.get(name, {}) and f in scores.get(base, {}) for f in SERIES):
        return False
    return all(fold_result(scores[name][f], rule)["score"] > fold_result(scores[base][f], base_rule)["score"] + MARGIN
               for f in SERIES)


def verdict(scores: dict) -> list[str]:
    """The rule's answer, in sentences."""
    out = []
    complete = [r for r in scores if all(f in scores[r] for f in SERIES)]
    if DEFAULT not in complete:
        out.append(f"Today's default `{DEFAULT}` did not finish both folds, so no candidate could be compared "
                   "with it: the default stays by the rule (nothing can replace it).")
        return out
    for r in sorted(scores):
        if r == DEFAULT:
            continue
        if r not in complete:
            out.append(f"`{r}` finished only fold(s) {', '.join(sorted(scores[r]))}: it cannot be chosen this round.")
            continue
        auc = float(np.mean([fold_result(scores[r][f])["id"]["roc_auc"] for f in SERIES]))
        ok = auc >= SEED_STUDY_ID_AUC - 0.01
        out.append(f"`{r}`: mean ID ROC-AUC {auc:.3f} ({'eligible' if ok else 'not eligible'}); "
                   f"{'beats' if ok and beats(scores, r, DEFAULT) else 'does not beat'} the default by more than "
                   f"{MARGIN} on both folds.")
    for rule in RULES[2:]:
        out.append(f"Threshold rule `{rule}` on the default: "
                   f"{'beats' if beats(scores, DEFAULT, DEFAULT, rule, 'youden') else 'does not beat'} `youden` "
                   f"by more than {MARGIN} on both folds.")
    return out


# ------------------------------------------------------------------ tables

def recipe_table(scores: dict) -> str:
    head = ("| recipe | folds | ID ROC-AUC | LOCO acc. | worst shift spec. @ sens 0.95 | mean shift ECE | "
            "score IM / NORMAL2 | score (mean) | adult normals: spec. IM / NORMAL2 model [95% CI] | train min/fold |")
    lines = [head, "|" + "---|" * 10]
    for r in sorted(scores, key=lambda r: (-len(scores[r]), r)):
        e = [fold_result(scores[r][f]) for f in SERIES if f in scores[r]]
        mean = lambda g: float(np.mean([g(x) for x in e]))  # noqa: E731
        per = " / ".join(f"{fold_result(scores[r][f])['score']:.3f}" if f in scores[r] else "—" for f in SERIES)
        minutes = " / ".join(f"{float(scores[r][f].get('train_seconds', np.nan)) / 60:.0f}" if f in scores[r] else "—"
                             for f in SERIES)
        lines.append(f"| {r} | {'+'.join(f for f in SERIES if f in scores[r])} | {mean(lambda x: x['id']['roc_auc']):.3f} | "
                     f"{mean(lambda x: x['loco']['accuracy']):.3f} | "
                     f"{mean(lambda x: x['shift']['worst_specificity_at_sens95']):.3f} | "
                     f"{mean(lambda x: x['shift']['mean_ece']):.3f} | {per} | {mean(lambda x: x['score']):.3f} | "
                     f"{adult_cell(e)} | {minutes} |")
    return "\n".join(lines) + "\n"


def rule_table(scores: dict) -> str:
    head = ("| recipe | threshold rule | threshold IM / NORMAL2 | LOCO acc. | LOCO spec. | LOCO sens. | "
            "ID sens. | worst shift sens. | score IM / NORMAL2 | adult normals: spec. IM / NORMAL2 model [95% CI] |")
    lines = [head, "|" + "---|" * 10]
    for r in sorted(scores, key=lambda r: (-len(scores[r]), r)):
        folds = [f for f in SERIES if f in scores[r]]
        for rule in RULES:
            e = [fold_result(scores[r][f], rule) for f in folds]
            mean = lambda g: float(np.mean([g(x) for x in e]))  # noqa: E731
            lines.append(f"| {r} | {rule} | {_joined(e, 'threshold')} | "
                         f"{mean(lambda x: x['loco']['accuracy']):.3f} | {mean(lambda x: x['loco']['specificity']):.3f} | "
                         f"{mean(lambda x: x['loco']['sensitivity']):.3f} | {mean(lambda x: x['id']['sensitivity']):.3f} | "
                         f"{mean(lambda x: x['shift']['worst_sensitivity']):.3f} | "
                         f"{_joined(e, 'score')} | {adult_cell(e)} |")
    return "\n".join(lines) + "\n"


def _joined(results: list[dict], key: str) -> str:
    return " / ".join(f"{x[key]:.3f}" for x in results)


def stamp(out: Path) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    import ood

    n = len(adult_images(out))
    return (f"`PYTHONPATH=src python benchmarks/round3.py table --out {out}` at commit {commit}; machine "
            f"{ood.cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, no GPU; adult normals: {n} films "
            "(report part of adult_cxr_normal).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("adult", "table"))
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "round3")
    args = ap.parse_args(argv)
    if args.stage == "adult":
        adult_logits(args.out)
        return 0
    scores = fold_scores(args.out)
    text = "\n".join([stamp(args.out), "", recipe_table(scores), rule_table(scores),
                      *[f"* {v}" for v in verdict(scores)]]) + "\n"
    (args.out / "round3.json").write_text(json.dumps(
        {r: {f: {k: {x: v for x, v in fold_result(z, k).items() if x != "rows"} for k in RULES} for f, z in fs.items()}
         for r, fs in scores.items()}, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o)))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
