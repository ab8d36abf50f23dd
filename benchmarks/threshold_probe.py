"""Threshold rules of the bundled model, probed on adult normal films (no retraining).

    PYTHONPATH=src python benchmarks/threshold_probe.py [--out benchmarks/threshold_probe.md]

Reads the cached logits of benchmarks/chest_data.py: the bundled model's validation split (522
children, where every rule is fitted) and all cached adult normal films (771; none was ever used by
the pneumonia classifier). The selection rule was written before the numbers were looked at; it is
printed with them (``RULE``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chest_data  # noqa: E402

from pneumoscan.core import metrics  # noqa: E402
from pneumoscan.core.files import write_text  # noqa: E402
from pneumoscan.modeling import artifact  # noqa: E402

RULE = """Selection rule (written before looking): the candidates are fitted on the bundled model's validation
split (its logits, prior offset 0): `youden` (today's), `gap-mid` (the middle, in logit space, between the
95th percentile of NORMAL and the 5th percentile of PNEUMONIA validation logits) and `sens-floor-0.95`
(the highest threshold whose validation sensitivity is at least 0.95). A candidate replaces the default only
if (i) its validation sensitivity is >= 0.95, (ii) its specificity on the adult normal films is higher than
today's with non-overlapping Wilson 95% CIs, and (iii) the shift protocol (benchmarks/robustness.py: LOCO and
the acquisition suite) does not lower its specificity at sensitivity >= 0.95. (iii) needs the protocol's
per-fold scores, which are not in this checkout, and re-running it retrains the folds (out of scope for this
session): so no candidate can change the default here, whatever (i) and (ii) say."""


def candidates(y: np.ndarray, z: np.ndarray, youden: float) -> dict[str, float]:
    """Thresholds on the probability scale."""
    mid = (np.percentile(z[y == 0], 95) + np.percentile(z[y == 1], 5)) / 2
    grid = np.sort(metrics.sigmoid(z))
    floor = max(t for t in grid if (metrics.sigmoid(z[y == 1]) >= t).mean() >= 0.95)
    return {"youden (today)": youden, "gap-mid": float(metrics.sigmoid(mid)), "sens-floor-0.95": float(floor)}


def rate(k: int, n: int) -> str:
    lo, hi = metrics.proportion_ci(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "threshold_probe.md"))
    args = ap.parse_args()
    meta = artifact.read_meta(artifact.BUNDLED_MODEL)
    ch, ad = (dict(np.load(chest_data.CACHE / f"{n}.npz")) for n in ("children", "adult"))
    val = ch["part"] == "report"
    y = (ch["group"][val] == "children_pneumonia").astype(int)
    z, za = ch["logit"][val].astype(np.float64), ad["logit"].astype(np.float64)
    lines = [RULE, "", f"Data: validation split {len(y)} films ({int((y == 0).sum())} NORMAL, {int(y.sum())} "
             f"PNEUMONIA); adult normal films {len(za)} (adult_cxr_normal, every cached part). Wilson 95% CIs.", "",
             "| rule | threshold | val sensitivity | val specificity | adult normals: specificity |",
             "| --- | --- | --- | --- | --- |"]
    for name, t in candidates(y, z, meta.threshold).items():
        p, pa = metrics.sigmoid(z), metrics.sigmoid(za)
        lines.append(f"| {name} | {t:.4f} | {rate(int((p[y == 1] >= t).sum()), int(y.sum()))} | "
                     f"{rate(int((p[y == 0] < t).sum()), int((y == 0).sum()))} | {rate(int((pa < t).sum()), len(pa))} |")
    text = "# Threshold rules: an adult-normal probe\n\n`PYTHONPATH=src python benchmarks/threshold_probe.py`\n\n" + \
        "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
