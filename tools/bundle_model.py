"""Make a run's model.pt the package's bundled model: fp16 weights + a model card beside it.

    pneumoscan train --data ../shared/data/chest_xray \
        --backbone-weights ../shared/weights/mobilenet_v2_imagenet.pth --out runs --name bundled
    python tools/bundle_model.py runs/bundled --recipe RECIPE
    rm -rf .cache/chest && nice -n 10 python benchmarks/chest_data.py && python tools/add_chest_detector.py
    python benchmarks/ood_check.py --model src/pneumoscan/assets/model.pt --run runs/bundled \
        --json benchmarks/ood_check.json
    python tools/bundle_model.py runs/bundled --recipe RECIPE --card-only

Writes src/pneumoscan/assets/model.pt (< 10 MB), its ONNX export model.onnx (see
tools/export_bundled_onnx.py) and src/pneumoscan/assets/MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumoscan.modeling import artifact
from pneumoscan.core import calibration
from pneumoscan.core.files import file_sha256, write_text

sys.path.insert(0, str(Path(__file__).parent))
import export_bundled_onnx  # noqa: E402  (the tool beside this one)

ASSETS = Path(artifact.BUNDLED_MODEL).parent


def card(meta: artifact.ModelMeta, validation: dict, command: str, where: str, sha256: str = "",
         recipe: str = "") -> str:
    if meta.is_ensemble:
        model_line = model_paragraph_ensemble(meta)
        data_line = training_paragraph_ensemble(meta, where)
    else:
        model_line, data_line = model_paragraph(meta), training_paragraph(meta, where)
    file_line = ""
    if sha256:  # as tools/add_data_digests.py writes it
        file_line = (f"\n**File.** `model.pt`, sha256 `{sha256}`; it records the content digests of its training "
                     f"and validation files ({len(meta.data_digests)} distinct), so `pneumoscan evaluate` warns "
                     "when given any of them.\n" if meta.data_digests else
                     f"\n**File.** `model.pt`, sha256 `{sha256}`.\n")
    ci = validation["ci95"]
    decisions = unsure_paragraph(meta, validation) + prior_paragraph(meta) + shift_paragraph(recipe)
    rows = "\n".join(f"| {k} | {validation[k]:.3f} | [{ci[k][0]:.3f}, {ci[k][1]:.3f}] |"
                     for k in ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc"))
    return f"""# Model card: pneumoscan bundled model

**Intended use.** A screening aid and second opinion for pediatric chest X-rays (frontal view): it
orders a worklist by the probability of pneumonia and shows Grad-CAM maps of where it looked. It
is not a diagnosis; a radiologist reviews every image.

{model_line}
{file_line}{decisions}
{data_line}

**Validation metrics** (the split that early stopping and calibration used; optimistic by construction —
benchmarks/accuracy.md has out-of-fold cross-validation of the recipe):

| metric | value | 95% CI |
| --- | --- | --- |
{rows}

**Limitations.** Trained on one centre's pediatric images: expect lower specificity on other
hospitals, scanners, adults, and at other pneumonia prevalences. No lateral views. Bacterial and viral
pneumonia are not told apart. Unusual inputs are flagged by the input checks above, which were tested on
proxies only: a wrong study that resembles a frontal chest film can still get a label.
Grad-CAM on cross-validation errors sometimes points at the "R" laterality marker, image borders or
ECG leads: features that differ between hospitals.

**Reproduce.**

```bash
{command}
```
"""


def _how(cfg: dict, feature_seconds) -> str:
    if cfg["model"]["unfreeze_blocks"] != 0:
        return (f"Adam, head {cfg['train']['lr']:g}, backbone {cfg['train']['backbone_lr']:g}, "
                f"{cfg['train']['schedule']} schedule")
    return (f"head trained on cached features of {cfg['train']['views']} augmented views per image"
            + (f" ({feature_seconds} s of feature extraction)" if feature_seconds else ""))


def model_paragraph(meta: artifact.ModelMeta) -> str:
    tuning = "fine-tuned end to end" if meta.config["model"]["unfreeze_blocks"] != 0 else "frozen"
    return (f"**Model.** {meta.architecture} (ImageNet weights: {Path(meta.backbone_weights['source']).name}, "
            f"{tuning}) with the head `{meta.head}`; input {meta.image_size}×{meta.image_size} grayscale, "
            f"normalisation {meta.normalization.name}; temperature {meta.temperature:.3f} (fitted on validation); "
            f"decision threshold {meta.threshold:.4f} ({calibration.describe_rule(meta.threshold_rule)}). Weights stored "
            "as fp16, computed in fp32.")


def training_paragraph(meta: artifact.ModelMeta, where: str) -> str:
    t, cfg = meta.training, meta.config
    return (f"**Training data.** Kermany et al. (2018) pediatric chest X-rays (Guangzhou Women and Children's "
            f"Medical Center, ages 1–5), the Kaggle training split: {t.n_train} images for training and a "
            f"patient-grouped validation split of {t.n_val} images. Augmentation `{cfg['data']['augment']}`, "
            f"class weights `{cfg['data']['class_weights']}`; {_how(cfg, t.feature_seconds)}: {t.epochs_run} epochs "
            f"(best {t.best_epoch}), {t.seconds} s of training ({t.seconds_per_epoch} s/epoch) on {where}.")


def model_paragraph_ensemble(meta: artifact.ModelMeta) -> str:
    rows = []
    for m in meta.members:
        tuning = "fine-tuned" if (m.config.get("model") or {}).get("unfreeze_blocks", 0) != 0 else "frozen"
        rows.append(f"{m.architecture} ({tuning}, head `{m.head}`, augmentation `{m.config['data']['augment']}`, "
                    f"normalisation {m.normalization.name}, temperature {m.temperature:.3f})")
    return (f"**Model.** A deep ensemble of {len(meta.members)} members, each an ImageNet-initialised "
            + "; ".join(rows) + f". Its output is the mean of the members' calibrated logits divided by the "
            f"ensemble's own temperature {meta.temperature:.3f}; decision threshold {meta.threshold:.4f} "
            f"({calibration.describe_rule(meta.threshold_rule)}), both fitted on validation. Input "
            f"{meta.image_size}×{meta.image_size} grayscale. Weights stored as fp16, computed in fp32.")


def training_paragraph_ensemble(meta: artifact.ModelMeta, where: str) -> str:
    t = meta.training
    parts = []
    for m in meta.members:
        cfg = m.config
        parts.append(f"`{Path(m.source.get('run', '?')).name}`: augmentation `{cfg['data']['augment']}`, class weights "
                     f"`{cfg['data']['class_weights']}`, {_how(cfg, None)}, at most {cfg['train']['epochs']} epochs "
                     f"with patience {cfg['train']['patience']}")
    return (f"**Training data.** Kermany et al. (2018) pediatric chest X-rays (Guangzhou Women and Children's "
            f"Medical Center, ages 1–5), the Kaggle training split: {t.n_train} images for training and a "
            f"patient-grouped validation split of {t.n_val} images, the same for every member. Members: "
            + "; ".join(parts) + f". Trained on {where}.")


def unsure_paragraph(meta: artifact.ModelMeta, validation: dict) -> str:
    """The UNSURE band, when the model has one (``ModelMeta.unsure``), with its validation coverage."""
    u = meta.unsure
    if not u:
        return ""
    counts = u.get("class_counts", {})
    sel = validation.get("selective")
    measured = ""
    if sel:
        lo, hi = sel["accuracy_ci95"]
        measured = (f" On the validation split it decided {sel['n_decided']} of {sel['n']} films (coverage "
                    f"{sel['coverage']:.3f}), with accuracy {sel['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on them "
                    f"(Wilson 95% CI, threshold {sel['threshold']:.4f}).")
    return (f"\n**UNSURE band.** A film with {u['low']:.4f} ≤ P(PNEUMONIA) < {u['high']:.4f} is labelled UNSURE: "
            f"Mondrian (class-conditional) split conformal prediction at {u['confidence']:g} confidence, fitted on "
            f"{u['n_calibration']} validation films ({counts.get('NORMAL', '?')} NORMAL, "
            f"{counts.get('PNEUMONIA', '?')} PNEUMONIA), gives such a film both classes (or none). The band "
            f"contains the threshold, so every decided film agrees with it.{measured}\n")


def shift_paragraph(recipe: str) -> str:
    """The recipe's numbers under the shift protocol (benchmarks/robustness.json), when it was measured."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.json"
    if not recipe or not path.is_file():
        return ""
    results = json.loads(path.read_text())["results"]
    if recipe not in results:
        return ""
    r = results[recipe]
    lo, hi = r["loco_specificity_ci"]
    return (f"\n**Under shift** (recipe `{recipe}`, benchmarks/robustness.md; two folds trained on the training split "
            f"without the films scored, so still an upper bound for another hospital): leave-one-collection-out "
            f"accuracy {r['loco_accuracy']:.3f}, sensitivity {r['loco_sensitivity']:.3f}, specificity "
            f"{r['loco_specificity_pooled']:.3f} [{lo:.3f}, {hi:.3f}] (Wilson 95% CI, pooled over 1,341 normals), at the "
            f"model's own threshold; over 26 acquisition shifts the worst specificity at sensitivity 0.95 is "
            f"{r['shift_worst_spec95']:.3f} and the mean ECE {r['shift_mean_ece']:.3f}; the worst specificity at its own "
            f"threshold is {r['shift_worst_specificity']:.3f} (per shift in benchmarks/robustness.md: strong JPEG compression, noise and zooming in are the weakest).\n")


def prior_paragraph(meta: artifact.ModelMeta) -> str:
    """The prevalence adaptation (``pneumoscan adapt``), when the model has one."""
    p = meta.prior or {}
    if "site" not in p:
        return ""
    return (f"\n**Prevalence adaptation.** Adapted to a site prevalence of {p['site']:.3f} (95% CI "
            f"{p['ci'][0]:.3f}–{p['ci'][1]:.3f}, bootstrap), estimated by {p['method'].upper()} (Saerens, Latinne & "
            f"Decaestecker 2002) from {p['n_images']} unlabelled films, against {p['calibration']:.3f} at calibration "
            f"({p.get('calibration_source', '?')}): every logit is shifted by {p['logit_offset']:+.3f}.\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder with model.pt and validation/metrics.json")
    p.add_argument("--where", default="2 CPU cores", help="the machine that trained it, for the card")
    p.add_argument("--recipe", default="", help="the recipe it was trained with (quotes benchmarks/robustness.json)")
    p.add_argument("--card-only", action="store_true",
                   help="rewrite only the card of the bundled model already there (e.g. after benchmarks/ood_check.py "
                        "--json measured that file): re-saving would change its sha256")
    args = p.parse_args()
    run = Path(args.run)
    validation = json.loads((run / "validation" / "metrics.json").read_text())
    if args.card_only:
        out = artifact.BUNDLED_MODEL
        meta = artifact.read_meta(out)
    else:
        model, meta = artifact.load(run / "model.pt")
        out = artifact.save(artifact.BUNDLED_MODEL, model, meta, half=True)
    command = ("pneumoscan train --data ../shared/data/chest_xray "
               "--backbone-weights ../shared/weights/mobilenet_v2_imagenet.pth --out runs --name bundled\n"
               f"python tools/bundle_model.py runs/bundled{' --recipe ' + args.recipe if args.recipe else ''}\n"
               "rm -rf .cache/chest && nice -n 10 python benchmarks/chest_data.py && python tools/add_chest_detector.py\n"
               "python benchmarks/ood_check.py --model src/pneumoscan/assets/model.pt --run runs/bundled "
               "--json benchmarks/ood_check.json\n"
               f"python tools/bundle_model.py runs/bundled{' --recipe ' + args.recipe if args.recipe else ''} --card-only")
    text = card(meta, validation, command, args.where, file_sha256(out), args.recipe)
    if meta.ood is not None:
        from add_ood import input_checks_section, with_section  # tools/, beside this script

        text = with_section(text, input_checks_section(meta, file_sha256(out)))
    write_text(ASSETS / "MODEL_CARD.md", text)
    if not args.card_only:
        export_bundled_onnx.main()
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB) and {ASSETS / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
