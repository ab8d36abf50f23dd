"""Fit the out-of-distribution detector onto an existing model.pt, as training does at its end.

For a model trained before detectors existed (the bundled one): the training and validation
split is re-made from the model's own config (the same patient-grouped split its training
carved, by seed), the detector is fitted on the training films' features plus shifted copies,
its cut-offs on the validation films, and the model is written back with its OOD head and the
input-quality limits in its meta. Features can be cached between runs (``--features``).

    python tools/add_ood.py src/pneumoscan/assets/model.pt --data ../shared/data/chest_xray/train \\
        --features .cache/bundled-ood-features.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pneumoscan import artifact, console, data, features, gate, models, ood, shifts, train
from pneumoscan.config import RunConfig
from pneumoscan.files import write_text


BEGIN, END = "<!-- input checks: tools/add_ood.py -->", "<!-- end input checks -->"


def input_checks_section(meta: artifact.ModelMeta) -> str:
    o = meta.ood
    rows = "\n".join(f"| {r['name']} | {r['value']:g} | {r['kind']} |" for r in gate.limits_table(
        gate.QualityLimits.from_dict(meta.quality)))
    return f"""{BEGIN}
**Input checks.** Before the model's answer counts, every image passes an input-quality gate and an
out-of-distribution score (`pneumoscan.gate`, `pneumoscan.ood`; the proxy benchmark is
benchmarks/ood.md). `low_quality` (gate) and `not_chest_xray` (distance above
{o['cutoff_not_chest']:.1f}, the {o['percentile']:g}th percentile of {o['n_val']} validation films) make the
label NOT_ASSESSED; `out_of_distribution` (above {o['cutoff_ood']:.1f}, the {o['ood_percentile']:g}th
percentile) keeps the label and marks the image as unlike the training films. The distance is the
Mahalanobis distance of the model's pooled features, its covariance fitted on {o['n_fit']} training films
and shifted copies of them. On our own proxy sets (not the project's held-back sets) it left NOT_ASSESSED
100% of non-radiographs, 91% of other-study proxies, 0.6% of held-out films and 2.1% of shifted films.
The validation films were in the bundled model's training run (early stopping and calibration), not in
its gradient steps. Gate limits (minimum side and aspect reasoned, the rest fitted on training films):

| limit | value | origin |
| --- | --- | --- |
{rows}
{END}
"""


def with_section(card: str, section: str) -> str:
    if BEGIN in card:
        return card[:card.index(BEGIN)] + section + card[card.index(END) + len(END) + 1:]
    marker = "**Limitations.**"
    return card.replace(marker, section + "\n" + marker) if marker in card else card + "\n" + section


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model.pt to extend (written in place)")
    p.add_argument("--data", required=True, help="the data the model was trained on (its config's data.root layout)")
    p.add_argument("--features", help="cache the embedded features in this .npz")
    p.add_argument("--half", action="store_true", help="store the backbone weights as fp16 (as the bundled model)")
    p.add_argument("--card", help="model card (markdown) whose 'Input checks' section to write")
    args = p.parse_args()
    console.configure_logging(False)
    model, meta = artifact.load(args.model)
    config = RunConfig.from_dict(meta.config | {"data": meta.config["data"] | {"root": args.data}})
    samples = train.split_samples(config, None)
    kept, images, _ = data.load_images([s for s in samples if s.split in ("train", "val")], meta.image_size)
    split = train.by_split(kept, images)
    (train_samples, train_images), (_, val_images) = split["train"], split["val"]
    labels = np.array([s.label for s in train_samples])
    cache = Path(args.features) if args.features else None
    if cache and cache.is_file():
        stored = np.load(cache)
        fit_features, fit_labels, val_features = stored["fit"], stored["labels"], stored["val"]
    else:
        shifted, source = shifts.shifted_views(train_images, len(train_images) // 4, seed=config.train.seed)
        fit_features = features.embed(model, np.concatenate([train_images, shifted])).numpy()
        fit_labels = np.concatenate([labels, labels[source]])
        val_features = features.embed(model, val_images).numpy()
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, fit=fit_features, labels=fit_labels, val=val_features)
    state = ood.fit(fit_features, fit_labels, val_features, feature_source="model.embed")
    arrays = ood.arrays(state)
    model.ood_head = models.MahalanobisHead(arrays["W"], arrays["b"], arrays["M"], l2_normalize=state.l2_normalize)
    meta = meta.replace(ood=ood.describe(state), quality=gate.default_limits(meta.image_size).to_dict())
    artifact.save(args.model, model, meta, half=args.half)
    if args.card:
        write_text(args.card, with_section(Path(args.card).read_text(), input_checks_section(meta)))
    print(f"{args.model}: OOD cut-offs {state.cutoff_not_chest:.1f} (not_chest_xray) / {state.cutoff_ood:.1f} "
          f"(out_of_distribution) from {state.n_val} validation films; fitted on {state.n_fit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
