"""Benchmark: the input checks of a model with a chest-film detector, on the *report* parts.

    nice -n 10 env PYTHONPATH=src python benchmarks/chest_data.py   # features (cached)
    PYTHONPATH=src python benchmarks/chest.py [--out benchmarks/ood.md]

Decides every cached image exactly as the CLI, API, page and report do (``decision.decide`` on the
model's logit, Mahalanobis score, chest-film logit and the quality gate), with the meta of the
bundled model.pt, and writes the table of benchmarks/ood.md's first section (the rest of that file,
the former detector's study, is kept below it). Report parts (benchmarks/chest_data.py): the
bundled model's own validation split for children (patients the detector never saw), and the
sha256-bucket 8-9 files of adult_cxr_normal and other_radiographs, plus generated
non-radiographs of another seed and scikit-learn's / matplotlib's sample photos. None of them was
used to fit the detector or choose its cut-off. Rates come with Wilson 95% CIs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chest_data  # noqa: E402

from pneumoscan.core.metrics import proportion_ci  # noqa: E402
from pneumoscan.modeling import artifact  # noqa: E402
from pneumoscan.safety import decision, gate  # noqa: E402

BEGIN, END = "<!-- chest-film detector: benchmarks/chest.py -->", "<!-- end chest-film detector -->"
FAILED = [gate.Flag(gate.CODE, "cached", "failed the quality gate")]
TARGETS = {"children": "not_chest ≤ 1%, NOT_ASSESSED ≤ 3%", "adults": "not_chest ≤ 2%",
           "other": "NOT_ASSESSED ≥ 95%", "non": "NOT_ASSESSED ≥ 95%"}


def rows_of(meta, arrays: dict, mask: np.ndarray, policy: str) -> list[decision.Verdict]:
    quality = [FAILED if f else [] for f in arrays["gate_failed"][mask]]
    chest = arrays.get("chest_logit")
    return decision.decide(meta, arrays["logit"][mask], arrays["ood"][mask], quality,
                           chest_logits=None if chest is None else chest[mask], policy=policy)


def rate(k: int, n: int) -> str:
    lo, hi = proportion_ci(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def groups(parts: dict) -> list[tuple[str, str, str, np.ndarray]]:
    """(row name, cache name, target key, mask) of every reported group."""
    out = []
    ch = parts["children"]
    out.append(("children, the model's validation split (Guangzhou)", "children", "children", ch["part"] == "report"))
    ad = parts["adult"]
    out.append(("adults' frontal films (adult_cxr_normal, RSNA/NIH)", "adult", "adults", ad["part"] == "report"))
    ot = parts["other"]
    radio = np.array([not g.startswith("nonradiograph") for g in ot["group"]])
    out.append(("other radiographs (all body parts, lateral chests)", "other", "other", (ot["part"] == "report") & radio))
    for g in sorted(set(ot["group"][radio])):
        out.append((f"… {g}", "other", "", (ot["part"] == "report") & (ot["group"] == g)))
    out.append(("non-radiographs: MRI and ultrasound (other_radiographs)", "other", "non",
                (ot["part"] == "report") & ~radio))
    out.append(("non-radiographs: generated + sample photos (seed 2)", "negatives_report", "non",
                np.ones(len(parts["negatives_report"]["logit"]), bool)))
    return out


def table(meta, parts: dict) -> str:
    lines = ["| group | n | not_chest_xray | outside_training_population | NOT_ASSESSED (default) | "
             "NOT_ASSESSED (warn) | target |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, cache, target, mask in groups(parts):
        v = rows_of(meta, parts[cache], mask, "not_assessed")
        w = rows_of(meta, parts[cache], mask, "warn")
        n = len(v)
        if not n:
            continue
        nc = sum(decision.NOT_CHEST in x.flags for x in v)
        op = sum(decision.OUTSIDE_POPULATION in x.flags for x in v)
        lines.append(f"| {name} | {n} | {rate(nc, n)} | {rate(op, n)} | {rate(sum(not x.assessed for x in v), n)} | "
                     f"{rate(sum(not x.assessed for x in w), n)} | {TARGETS.get(target, '')} |")
    return "\n".join(lines)


def adult_specificity(meta, parts: dict) -> str:
    """The model's answer on the adult normals it would judge under ``warn``: a shift probe."""
    a = parts["adult"]
    v = [x for x in rows_of(meta, a, a["part"] == "report", "warn") if x.assessed]
    normal = sum(x.prediction == 0 for x in v)
    return (f"Under `warn`, the model labels {rate(len(v) - normal, len(v))} of the report part's assessed adult "
            f"normal films PNEUMONIA (specificity {rate(normal, len(v))}, threshold {meta.threshold:.4f}): "
            "the reason `outside_training_population` is NOT_ASSESSED by default.")


def section(meta, parts: dict, sha: str) -> str:
    c = meta.chest
    fitted = ", ".join(f"{n} {k}" for k, n in c["fitted_on"].items())
    return f"""{BEGIN}
# Input checks of the bundled model: two questions, two answers

`PYTHONPATH=src python benchmarks/chest.py` after `nice -n 10 env PYTHONPATH=src python benchmarks/chest_data.py`
(features of the bundled model, cached); model.pt sha256 `{sha}`; machine: {platform.machine()},
{os.cpu_count()} CPUs (shared), Python {platform.python_version()}.

Report parts only (fixed rule in benchmarks/chest_data.py: sha256 of the file path, buckets 8-9; for
children the model's own validation split, whose patients neither the classifier's gradient steps nor
the detector saw). The chest-film detector was fitted on the fit parts ({fitted}); its cut-off
{c['cutoff']:.3f} on the calibrate parts ({c['rule']}). Rates with Wilson 95% CIs. *default*:
`outside_training_population` gives NOT_ASSESSED; *warn*: the site policy that keeps the label.

{table(meta, parts)}

{adult_specificity(meta, parts)}

These are the shared development sets, not the project's held-back films; other_radiographs shares its
main source (UNIFESP) with a held-back set, so its rates may be correlated with that set's.
{END}
"""


def with_chest_logits(meta, model, parts: dict) -> dict:
    """Add each cached group's chest-film logit (the model's head, the inference path's numbers)."""
    import torch

    for arrays in parts.values():
        with torch.inference_mode():
            arrays["chest_logit"] = model.chest_head(torch.from_numpy(arrays["features"])).numpy()
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(artifact.BUNDLED_MODEL))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "ood.md"))
    args = ap.parse_args()
    from pneumoscan.core.files import file_sha256, write_text

    model, meta = artifact.load(args.model)
    if meta.chest is None:
        raise SystemExit(f"{args.model} has no chest-film detector: run tools/add_chest_detector.py")
    names = ("children", "adult", "other", "negatives_report")
    parts = with_chest_logits(meta, model, {n: dict(np.load(chest_data.CACHE / f"{n}.npz")) for n in names})
    text = section(meta, parts, file_sha256(args.model))
    print(text)
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    if BEGIN in old:
        old = old[:old.index(BEGIN)] + old[old.index(END) + len(END) + 1:]
    write_text(out, text + "\n" + old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
