"""Repair the bundled model's calibration-prior record without touching its probabilities.

    PYTHONPATH=src python tools/repair_prior.py [--model src/pneumoscan/assets/model.pt] [--cache val.npz]

The bundled model (made before ``calibration.fit_intercept`` clipped infinite logits) recorded
``prior["effective"] = 0.9969``: nine validation films have probabilities that round to 1.0 in
float64, ``logit()`` of them is +inf, the intercept fit's objective was nan and the bounded search
returned its first golden-section point, b = -4.72 (sigmoid(logit(0.743) + 4.72) = 0.9969).
This tool re-scores the model's own validation split (the patient-grouped split its config names:
``data.assign_validation`` with its seed), recomputes the record from the calibrated logits with
today's ``train.calibration_prior`` (effective prior, validation reference) and the OOD
validation-score quantiles, and rewrites the meta only: the state_dict is written back as read
(fp16 stays fp16). It then checks that the old and new files give the same probabilities (to 1e-6)
on the repo's sample films and rewrites the ONNX export's metadata document (its graph unchanged)
with the new sha256, which ``inference.loading`` checks.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pneumoscan.core import calibration
from pneumoscan.core.files import atomic_path, file_sha256
from pneumoscan.io import data, imaging
from pneumoscan.modeling import artifact
from pneumoscan.safety import ood as ood_mod
from pneumoscan.training import calibrate as train_calibrate

SAMPLE = Path(__file__).parents[1] / "examples" / "chest_xray_sample"


def validation_scores(model: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated logits, labels, OOD scores) of the model's validation split."""
    if cache and cache.is_file():
        d = np.load(cache)
        return d["logits"], d["y"], d["ood"]
    from pneumoscan.inference.engines import TorchEngine

    engine = TorchEngine(model)
    cfg = (engine.meta.members[0].config if engine.meta.members else engine.meta.config)["data"]
    seed = int(((engine.meta.members[0].config if engine.meta.members else engine.meta.config).get("train") or {})
               .get("seed", 42))
    samples = data.assign_validation(data.scan(cfg["root"]), val_fraction=cfg["val_fraction"],
                                     min_val_images=cfg["min_val_images"], seed=seed)
    val = [s for s in samples if s.split == "val"]
    kept, decoded = data.decode_samples(val, engine.meta.image_size)
    logits, scores = engine.assess(decoded.images)
    y = np.array([s.label for s in kept])
    if cache:
        np.savez(cache, logits=logits, y=y, ood=scores)
    return np.asarray(logits, np.float64), y, np.asarray(scores, np.float64)


def sample_probabilities(model: Path) -> np.ndarray:
    from pneumoscan.inference.engines import TorchEngine

    files = imaging.collect_files([SAMPLE])
    decoded = imaging.decode_many(files, 224)
    return TorchEngine(model).predict_proba(decoded.images)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=artifact.BUNDLED_MODEL)
    ap.add_argument("--cache", type=Path, help="npz of the validation scores (written on first run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    import torch

    blob = artifact.read(args.model)
    meta = artifact.ModelMeta.from_dict(blob["meta"])
    z, y, scores = validation_scores(args.model, args.cache)
    prior = train_calibrate.calibration_prior(y, z, "validation split") | {
        "repaired": "tools/repair_prior.py: recomputed from the validation split's calibrated logits (the recorded "
                    f"effective prior {meta.prior.get('effective'):.4f} came from a nan objective)"}
    ood = dict(meta.ood or {})
    if ood:
        ood["extra"] = dict(ood.get("extra") or {}) | {"val_score_quantiles": [
            float(v) for v in np.quantile(scores, np.linspace(0, 1, ood_mod.VAL_QUANTILES))]}
    new = meta.replace(prior=prior, ood=ood or None)
    with tempfile.TemporaryDirectory() as tmp:
        old_copy = Path(tmp) / "old.pt"
        shutil.copyfile(args.model, old_copy)
        with atomic_path(args.model) as out:
            with open(out, "wb") as f:
                torch.save({"format": artifact.FORMAT, "meta": new.to_dict(), "state_dict": blob["state_dict"]}, f)
        diff = float(np.max(np.abs(sample_probabilities(old_copy) - sample_probabilities(args.model))))
    print(f"effective prior {meta.prior.get('effective')} -> {prior['effective']:.4f}; EM on the validation "
          f"reference from it: {calibration.em_consistency(prior['validation'], prior['effective']):.4f} (share "
          f"{prior['calibration']:.4f}); max |probability change| on the sample films: {diff:.2e}")
    if diff > 1e-6:
        raise SystemExit("probabilities changed: not repaired")
    onnx_path = args.model.with_suffix(".onnx")
    if onnx_path.is_file():
        import onnx

        from pneumoscan.inference.onnx_format import get_document, set_document

        proto = onnx.load(str(onnx_path))
        doc = get_document(proto, onnx_path)
        set_document(proto, doc | {"meta": new.to_dict(), "source_sha256": file_sha256(args.model)})
        with atomic_path(onnx_path) as tmp_path:
            onnx.save(proto, str(tmp_path))
        print(f"{onnx_path}: metadata document renewed (source sha256 {file_sha256(args.model)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
