"""Fit the "is this a frontal chest X-ray?" detector onto a model.pt, without touching its answers.

    nice -n 10 env PYTHONPATH=src python benchmarks/chest_data.py          # features, cached
    PYTHONPATH=src python tools/add_chest_detector.py                       # bundled model.pt + model.onnx + card

What it does (``safety.chest``): a logistic regression on the model's pooled features (for the
bundled model, frozen ImageNet features), fitted on the *fit* parts of benchmarks/chest_data.py
(children of the model's training split and adults' frontal films as positives, each population
weighted equally; other radiographs and generated non-radiographs as negatives); its cut-off
chosen on the *calibrate* parts; the report parts are never read here. The model gets a
``chest_head`` (weights in fp32, beside the OOD head) and ``meta.chest``; everything else in the
file is copied unchanged, and the tool refuses to write when any pneumonia probability of the
200 example films moves by more than 1e-6. It then re-exports model.onnx (output ``chest_logit``)
and rewrites the model card's input-checks section.

Run it *after* any other edit of model.pt's meta (tools/add_ood.py, a prior repair): it loads the
current file and only adds the detector.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tools"))

import chest_data  # noqa: E402  (benchmarks/chest_data.py: the parts and the cached features)

from pneumoscan.core.files import file_sha256, write_text  # noqa: E402
from pneumoscan.core.metrics import sigmoid  # noqa: E402
from pneumoscan.modeling import artifact  # noqa: E402
from pneumoscan.safety import chest  # noqa: E402

C = 0.05  # inverse L2 strength, fixed in advance (not tuned on any part)
RULE = ("cut-off = lowest 1st percentile of the calibrate chest films' logits (children, adults separately), "
        "moved half-way in logit space to the 99th percentile of the calibrate negatives when below it")


def load_parts() -> dict[str, dict[str, np.ndarray]]:
    """{cache name: arrays} of benchmarks/chest_data.py's cache; raises when it was not made."""
    out = {}
    for name in ("children", "adult", "other", "negatives_fit", "negatives_calibrate", "negatives_report"):
        path = chest_data.CACHE / f"{name}.npz"
        if not path.exists():
            raise SystemExit(f"{path} missing: run benchmarks/chest_data.py first")
        out[name] = dict(np.load(path))
    return out


def select(parts: dict, names: tuple[str, ...], part: str) -> np.ndarray:
    return np.concatenate([parts[n]["features"][parts[n]["part"] == part] for n in names])


def fit_state(parts: dict) -> chest.ChestState:
    kids, adults = (select(parts, (n,), "fit") for n in ("children", "adult"))
    neg = select(parts, ("other", "negatives_fit"), "fit")
    pos = np.concatenate([kids, adults])
    weights = np.r_[np.full(len(kids), 0.5 / len(kids)), np.full(len(adults), 0.5 / len(adults))]
    w, b = chest.fit(pos, neg, c=C, pos_weights=weights)
    state = chest.ChestState(weights=w.astype(np.float32), bias=b, cutoff=0.0, rule=RULE,
                             fitted_on={"children (training split)": len(kids), "adults": len(adults),
                                        "negatives": len(neg)})
    groups = {g: chest.logit(state, select(parts, (n,), "calibrate")) for g, n in (("children", "children"),
                                                                                 ("adults", "adult"))}
    negs = chest.logit(state, select(parts, ("other", "negatives_calibrate"), "calibrate"))
    state.cutoff, state.calibration = chest.choose_cutoff(groups, negs)
    return state


def example_images(size: int) -> np.ndarray:
    from pneumoscan.io import imaging

    files = imaging.collect_files([ROOT / "examples" / "chest_xray_sample"])
    return imaging.decode_many(files, size, warn=False).images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(artifact.BUNDLED_MODEL), help="model.pt to extend (written in place)")
    p.add_argument("--card", default=str(Path(artifact.BUNDLED_MODEL).parent / "MODEL_CARD.md"))
    p.add_argument("--no-onnx", action="store_true", help="do not re-export the bundled model.onnx")
    args = p.parse_args()
    from pneumoscan.inference.torch_model import predict_logits

    import add_ood

    state = fit_state(load_parts())
    model, meta = artifact.load(args.model)
    images = example_images(meta.image_size)
    before = predict_logits(model, images)
    model.chest_head = chest.torch_module(state)
    half = any(str(v.dtype) == "torch.float16" for v in artifact.read(args.model)["state_dict"].values())
    meta = meta.replace(chest=state.describe())
    tmp = Path(args.model).with_suffix(".chest.tmp.pt")
    artifact.save(tmp, model, meta, half=half)
    after_model, _ = artifact.load(tmp)
    delta = float(np.abs(sigmoid(predict_logits(after_model, images)) - sigmoid(before)).max())
    if not delta <= 1e-6:
        tmp.unlink()
        raise SystemExit(f"refused: the pneumonia probabilities moved by {delta:.2e} (> 1e-6)")
    tmp.replace(args.model)
    print(f"{args.model}: chest-film detector added, cut-off {state.cutoff:.3f}; max |Δ P(PNEUMONIA)| on "
          f"{len(images)} example films {delta:.1e}")
    if not args.no_onnx and Path(args.model).resolve() == Path(artifact.BUNDLED_MODEL).resolve():
        import export_bundled_onnx

        export_bundled_onnx.main()
    if args.card and Path(args.card).exists():
        write_text(args.card, add_ood.with_section(Path(args.card).read_text(), add_ood.input_checks_section(
            meta, file_sha256(args.model))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
