"""Fit the out-of-distribution detector onto an existing model.pt, as training does at its end.

For a model trained before detectors existed (the bundled one): the training and validation
split is re-made from the model's own config (the same patient-grouped split its training
carved, by seed), the detector is fitted on the training films' features plus shifted copies,
its cut-offs on the validation films (``calibrate.fit_ood``, what training does at its end), and the
model is written back with its OOD head and the input-quality limits in its meta.

    python tools/add_ood.py src/pneumoscan/assets/model.pt --data ../shared/data/chest_xray/train \\
        --half --card src/pneumoscan/assets/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from pneumoscan.modeling import artifact
from pneumoscan.cli import console
from pneumoscan.io import data
from pneumoscan.safety import gate
from pneumoscan.training import calibrate, loaders
from pneumoscan.core.config import RunConfig
from pneumoscan.core.files import file_sha256, write_text


BEGIN, END = "<!-- input checks: tools/add_ood.py -->", "<!-- end input checks -->"
OOD_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "ood_check.json"  # benchmarks/ood_check.py --json


def proxy_sentence(sha256: str) -> str:
    """What benchmarks/ood_check.py measured for this very file, or that it was not measured."""
    measured = json.loads(OOD_CHECK.read_text()) if OOD_CHECK.is_file() else {}
    if measured.get("model_sha256") != sha256:
        return "Its proxy rates were not measured for this file (run `python benchmarks/ood_check.py --json ...`)."
    r = {k: v["not_assessed"] for k, v in measured["rates"].items()}
    return (f"On our own quick proxies (`python benchmarks/ood_check.py`, this model; not the project's held-back "
            f"sets) it left NOT_ASSESSED {r['non-radiographs (scikit-image photos)']:.0%} of 18 non-radiograph photos, "
            f"{r['films rotated 90 degrees']:.1%} of films rotated 90°, {r['films upside down']:.1%} of films upside "
            f"down, {r['inverted films']:.1%} of inverted films, {r['validation films']:.1%} of the validation films and "
            f"{r['validation films, random acquisition shifts']:.1%} of validation films under one or two random "
            "acquisition shifts (benchmarks/ood.md measured the former fine-tuned model's detector more fully).")


def chest_sentence(meta: artifact.ModelMeta) -> str:
    """The chest-film detector's paragraph, or that the model has none."""
    from pneumoscan.safety import decision

    c = meta.chest
    if not c:
        return ("This model has no chest-film detector: a far distance gives `outside_training_population` "
                "whether or not the image is a chest film.")
    cal = c.get("calibration", {})
    fitted = ", ".join(f"{n} {k}" for k, n in (c.get("fitted_on") or {}).items())
    return (f"`{decision.NOT_CHEST}` — \"{decision.SENTENCES[decision.NOT_CHEST]}\" — comes from a separate "
            "detector (`pneumoscan.safety.chest`, `tools/add_chest_detector.py`): a logistic regression on the "
            f"model's pooled ImageNet features, fitted on frontal chest films of children *and* adults against "
            f"other radiographs, lateral chests, other modalities and non-radiographs ({fitted}); label "
            f"NOT_ASSESSED below the logit {c['cutoff']:.2f} ({c.get('rule', '')}; calibrate-part numbers: "
            f"{json.dumps(cal.get('positive_p1', {}))}, negatives' 99th percentile "
            f"{cal.get('negative_p99', float('nan')):.2f}). Held-out rates: benchmarks/ood.md.")


def input_checks_section(meta: artifact.ModelMeta, sha256: str = "") -> str:
    from pneumoscan.safety import decision

    o = meta.ood
    rows = "\n".join(f"| {r['name']} | {r['value']:g} | {r['kind']} |" for r in gate.limits_table(
        gate.QualityLimits.from_dict(meta.quality)))
    return f"""{BEGIN}
**Input checks.** Before the model's answer counts, every image passes an input-quality gate, a
chest-film detector and an out-of-distribution score (`pneumoscan.safety.gate`, `.chest`, `.ood`;
benchmarks/ood.md). Two questions, two answers: {chest_sentence(meta)}
`{decision.OUTSIDE_POPULATION}` — "{decision.SENTENCES[decision.OUTSIDE_POPULATION]}" — is a
Mahalanobis distance of the model's pooled features above {o['cutoff_not_chest']:.1f} (the
{o['percentile']:g}th percentile of {o['n_val']} validation films; covariance fitted on {o['n_fit']}
training films and shifted copies of them): label NOT_ASSESSED by default; a site that validated the
model on its own films may make it a warning (`--outside-population warn` or
`PNEUMOSCAN_OUTSIDE_POPULATION=warn`). `{decision.OUT_OF_DISTRIBUTION}` (above {o['cutoff_ood']:.1f}, the
{o['ood_percentile']:g}th percentile) keeps the label and marks the image as unusual. `low_quality` (gate)
makes the label NOT_ASSESSED. {proxy_sentence(sha256)} The validation films were in the bundled model's
training run (early stopping and calibration), not in its gradient steps. Gate limits (minimum side and
aspect reasoned, the rest fitted on training films):

| limit | value | origin |
| --- | --- | --- |
{{rows}}
{END}
""".replace("{rows}", rows)


def with_section(card: str, section: str) -> str:
    if BEGIN in card:
        return card[:card.index(BEGIN)] + section + card[card.index(END) + len(END) + 1:]
    marker = "**Limitations.**"
    return card.replace(marker, section + "\n" + marker) if marker in card else card + "\n" + section


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model.pt to extend (written in place)")
    p.add_argument("--data", required=True, help="the data the model was trained on (its config's data.root layout)")
    p.add_argument("--half", action="store_true", help="store the backbone weights as fp16 (as the bundled model)")
    p.add_argument("--card", help="model card (markdown) whose 'Input checks' section to write")
    args = p.parse_args()
    console.configure_logging(False)
    model, meta = artifact.load(args.model)
    config = RunConfig.from_dict(meta.config | {"data": meta.config["data"] | {"root": args.data}})
    samples = loaders.split_samples(config, None)
    kept, images, _ = data.load_images([s for s in samples if s.split in ("train", "val")], meta.image_size)
    split = loaders.by_split(kept, images)
    detector = calibrate.fit_ood(model, split, seed=config.train.seed)  # as training's finalize does
    if detector is None:
        return 2
    meta = meta.replace(ood=detector, quality=gate.default_limits(meta.image_size).to_dict())
    artifact.save(args.model, model, meta, half=args.half)
    if args.card:
        write_text(args.card, with_section(Path(args.card).read_text(), input_checks_section(meta, file_sha256(args.model))))
    print(f"{args.model}: OOD cut-offs {detector['cutoff_not_chest']:.1f} (not_chest_xray) / "
          f"{detector['cutoff_ood']:.1f} (out_of_distribution) from {detector['n_val']} validation films; "
          f"fitted on {detector['n_fit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
