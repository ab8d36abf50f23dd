"""The commands that use a trained model: explore (data only), evaluate, robustness, predict,
explain, adapt and export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumoscan.cli import console
from pneumoscan.cli.common import CAM_METHODS, ENGINES, add_outside_population, add_parser, skipped_line
from pneumoscan.core.errors import UserError


def add_explore(sub) -> None:
    p = add_parser(sub, "explore", "describe a dataset: counts, samples, sizes, duplicates, patients",
                   "Describes a dataset without training anything. Writes to OUT: summary.md (images and "
                   "patients per split and class, image sizes and modes, unreadable files, duplicates, patients "
                   "in more than one split, balanced class weights), counts.csv, class_counts.png, samples.png "
                   "(sample images per class), image_stats.csv (one row per file), duplicates.csv and "
                   "patient_overlap.csv.")
    p.add_argument("--data", required=True, help="dataset root or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=8, help="sample images per class in samples.png")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample images shown")
    p.set_defaults(func=cmd_explore)


def cmd_explore(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import explore

    explore.explore(args.data, args.out, n_samples=args.samples, seed=args.seed)
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return 0


def add_labelled_data_options(p) -> None:
    """What evaluate and robustness both read: a model and labelled films, and where to write."""
    p.add_argument("--model", help="model.pt or .onnx [the bundled model]")
    p.add_argument("--data", required=True, help="dataset root (its test/ split is used) or NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", help="which split to use when DATA has several [test]")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")


def add_evaluate(sub) -> None:
    p = add_parser(sub, "evaluate", "measure a model on labelled images (metrics with 95%% CIs, plots)",
                   "Writes OUT/metrics.json (with stratified-bootstrap 95% CIs, Brier score, ECE and recall per "
                   "pneumonia subtype), OUT/predictions.csv and plots (ROC, PR, reliability), OUT/errors.csv "
                   "with Grad-CAM galleries of the most confident mistakes in OUT/errors/, OUT/evaluate.log, and "
                   "with --report one self-contained OUT/report.html. Scores come from the same engine as predict and "
                   "serve (--engine). The threshold is the one stored in the model (its rule is in the model card: "
                   "fixed, or fitted on validation data) unless --threshold overrides it.")
    add_labelled_data_options(p)
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--errors", type=int, default=16, metavar="K",
                   help="explain the K most confident false positives and false negatives in OUT/errors/ (0 = off)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for the errors")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html, one self-contained page")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="runtime for scores: auto = ONNX Runtime, as predict and serve use (PyTorch if export fails)")
    add_outside_population(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan.modeling import artifact
    from pneumoscan.evaluation import evaluate

    model = artifact.resolve(args.model)  # the report links the model's run folder: a real path, not None
    run_log = console.start_run_log()
    bars = console.StageBars()
    try:
        result = evaluate.run(model, args.data, args.out, threshold=args.threshold, split=args.split,
                     strict=args.strict, n_bootstrap=args.bootstrap, engine=args.engine,
                     decode_progress=lambda k: bars("decoding images", k, 0),
                     errors=args.errors, method=args.method, report=args.report)
    finally:
        bars.close()
        if Path(args.out).is_dir():
            run_log.attach(Path(args.out) / "evaluate.log")
        run_log.close()
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    if "n_in_training_data" in result.extra and result.extra["n_in_training_data"] != 0:
        print(f"pneumoscan: warning: {evaluate.overlap_sentence(result.extra['n_in_training_data'], result.n)}",
              file=sys.stderr)
    if args.errors > 0:  # the same words as the report
        fp, fn = result.metrics.confusion.fp, result.metrics.confusion.fn
        errors_dir = Path(args.out) / "errors"
        print("errors:  no errors at this threshold" if not fp + fn else
              f"errors:  {errors_dir}" if errors_dir.is_dir() and any(errors_dir.glob("*.png")) else
              f"errors:  {Path(args.out) / 'errors.csv'} (not explained: Grad-CAM needs the model.pt)")
    if args.report:
        print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def add_robustness(sub) -> None:
    p = add_parser(sub, "robustness", "how a model's numbers move under acquisition shifts, on your labelled films",
                   "Re-films every labelled image 26 ways (exposure, contrast, gamma, blur, sharpening, noise, JPEG, "
                   "resolution, zoom in and out, borders, letterboxing, burned-in markers, rotation) and writes "
                   "OUT/robustness.json and OUT/robustness.md: ROC-AUC, accuracy, sensitivity and specificity at the "
                   "model's own threshold, specificity at sensitivity 0.95, and ECE per shift, with the worst case. "
                   "A model whose specificity collapses under a mild shift will do the same on another machine's films.")
    add_labelled_data_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto", help="runtime for scores [auto = ONNX Runtime]")
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import robustness

    bars = console.StageBars()
    try:
        result = robustness.run(args.model, args.data, args.out, split=args.split, engine=args.engine,
                                strict=args.strict, progress=lambda k, n: bars("shifts", k, n))
    finally:
        bars.close()
    w = result["worst_case"]
    print(f"worst case over {len(result['rows']) - 1} shifts: specificity {w['worst_specificity']:.3f}, "
          f"sensitivity {w['worst_sensitivity']:.3f}, ROC-AUC {w['worst_roc_auc']:.3f}, ECE {w['worst_ece']:.3f}")
    if result.get("n_in_training_data"):
        print(f"pneumoscan: warning: {result['n_in_training_data']} of {result['n_images']} images were in the "
              "model's training data; the numbers are optimistic", file=sys.stderr)
    print(f"table:   {Path(args.out) / 'robustness.md'}")
    return 0


# as the web CSV; flags are ";"-separated codes, flag_details their sentences, " | "-separated
PREDICTION_COLUMNS = ["path", "probability", "prediction", "label", "threshold", "flags", "flag_details",
                      "model_sha256"]


def add_predict(sub) -> None:
    p = add_parser(sub, "predict", "score new images; CSV of probabilities",
                   "Scores unlabelled images and writes one CSV row per image (to stdout, or to --out): path, "
                   "P(PNEUMONIA), the 0/1 prediction and its label at the model's threshold, that threshold, "
                   "flags and the model file's sha256. An image the model is not competent for (flag "
                   "not_chest_xray, outside_training_population or low_quality) is labelled NOT_ASSESSED, its probability not meaningful; one in the "
                   "model's UNSURE band (its conformal prediction set is not a single class) is labelled UNSURE, "
                   "its prediction still the threshold's class; "
                   "out_of_distribution keeps the label but marks the image as unlike the training films. "
                   "Unreadable files are named on stderr and skipped (exit status 2); with --explain also one "
                   "Grad-CAM PNG per image.")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here instead of stdout")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="runtime: auto = ONNX Runtime through a cached export (PyTorch if export fails)")
    p.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM overlay PNG per image to DIR")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="explanation method for --explain")
    add_outside_population(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscan.core import files
    from pneumoscan.commands import predict

    rows, skipped = predict.predict_files(args.model, args.paths, threshold=args.threshold, engine=args.engine)
    table = [(r.path, f"{r.probability:.6f}", "" if r.prediction is None else r.prediction, r.label,
              round(r.threshold, 6), ";".join(r.flags), " | ".join(r.details), r.model_sha256) for r in rows]
    for path, reason in skipped:
        print(skipped_line(path, reason), file=sys.stderr)
    unreadable = f"; skipped {console.plural(len(skipped), 'unreadable file')}" if skipped else ""
    if args.out:
        files.write_csv(args.out, PREDICTION_COLUMNS, table)
        print(f"wrote {console.plural(len(rows), 'prediction')} to {args.out}{unreadable}", file=sys.stderr)
    else:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows(table)
        if len(skipped) > 1:
            print(f"pneumoscan: {unreadable.removeprefix('; ')}", file=sys.stderr)
    if args.explain and rows:
        from pneumoscan.evaluation import explain

        written, _ = explain.explain_files(args.model, [r.path for r in rows], args.explain, args.method,
                                           threshold=args.threshold)
        print(f"wrote {console.plural(len(written), 'explanation')} to {args.explain}", file=sys.stderr)
    return 2 if skipped else 0


def add_explain(sub) -> None:
    p = add_parser(sub, "explain", "Grad-CAM overlays: where in each X-ray the PNEUMONIA score came from",
                   "Writes one PNG per image: the X-ray beside its heat map, titled with P(PNEUMONIA) and the "
                   "predicted label, and OUT/explanations.csv (per image: the scale, whether the map is flat, and the share "
                   "of its mass outside the lung fields and on the border). Warm regions raised the PNEUMONIA score; "
                   "with --scale absolute (default) a map's brightest colour is the image's probability, so a low "
                   "score looks low; relative scales each map to its own maximum. Maps are coarse and are not a "
                   "localisation of disease.")
    p.add_argument("--model", help="model.pt [the bundled model]")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="gradcam, gradcam++ or eigencam")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold for the label")
    p.add_argument("--scale", choices=("absolute", "relative"), default="absolute",
                   help="colour scale: absolute = the map times P(PNEUMONIA); relative = each map to its own maximum")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumoscan.evaluation import explain

    written, skipped = explain.explain_files(args.model, args.paths, args.out, args.method, threshold=args.threshold,
                                              scale=args.scale)
    for path, reason in skipped:
        print(skipped_line(path, reason), file=sys.stderr)
    print(f"wrote {console.plural(len(written), 'explanation')} to {args.out}")
    return 2 if skipped else 0


def add_adapt(sub) -> None:
    p = add_parser(sub, "adapt", "re-base a model's probabilities on a site's pneumonia prevalence",
                   "Estimates the site's pneumonia prevalence from its unlabelled films (EM, Saerens, Latinne & "
                   "Decaestecker 2002; 95% CI by bootstrap over the films) and writes a copy of the model whose "
                   "logits are shifted by logit(site) - logit(calibration prevalence). A threshold from a "
                   "prevalence-independent rule (youden, sensitivity:X) and the UNSURE band keep their logits; a "
                   "plain probability cut (e.g. 0.5) stays a probability. With --labels the temperature, threshold "
                   "and UNSURE band are re-fitted on the site's labelled films. The input model is never changed.")
    p.add_argument("--model", help="model.pt, or an exported .onnx (not with --labels) [the bundled model]")
    p.add_argument("--images", metavar="DIR", help="the site's unlabelled films (searched recursively)")
    p.add_argument("--db", metavar="URL", help="instead: re-fit temperature, threshold and UNSURE band on the result "
                   "store's read films (patient-grouped cross-fitting; registers the new version)")
    p.add_argument("--sensitivity-floor", type=float, default=0.95, metavar="F",
                   help="with --db: the threshold keeps the site sensitivity at or above F")
    p.add_argument("--out", required=True, help="the adapted copy to write (same suffix as the input)")
    p.add_argument("--labels", metavar="DIR", help="labelled site films (NORMAL/ and PNEUMONIA/) to re-fit the "
                   "temperature, threshold and UNSURE band on")
    p.add_argument("--train-prior", type=float, metavar="P", help="the PNEUMONIA share the model was calibrated at, "
                   "for models that do not record it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the estimate's CI")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from pneumoscan.safety import adapt

    if args.bootstrap < 1:
        raise UserError("--bootstrap must be at least 1")
    if args.db:
        from pneumoscan.cli.pilot import adapt_from_db

        return adapt_from_db(args)
    if not args.images:
        raise UserError("give --images DIR (unlabelled films) or --db URL (the store's read films)")
    result = adapt.run(args.model, args.images, args.out, labels=args.labels, train_prior=args.train_prior,
                       n_bootstrap=args.bootstrap)
    for warning in result["warnings"]:
        print(f"pneumoscan: warning: {warning}", file=sys.stderr)
    print(adapt.summary(result))
    return 0


def add_export(sub) -> None:
    p = add_parser(sub, "export", "export a model to ONNX, checked against PyTorch",
                   "Writes an ONNX model whose metadata carries the model's meta (input size,\n"
                   "threshold, class names...), checked against PyTorch. Input 'image': float32 (N,1,H,W)\n"
                   "in [0,1]; output 'logit': (N,); P(PNEUMONIA) = sigmoid(logit).\n"
                   "INT8 (--int8) was withdrawn: see benchmarks/int8_accuracy.md.")
    p.add_argument("--model", help="model.pt [the bundled model]")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    # withdrawn (issue 20): still parsed, so that using them says why instead of "unrecognized"
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibration", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.int8 or args.calibration:
        from pneumoscan.inference.onnx_format import INT8_WITHDRAWN

        raise UserError(INT8_WITHDRAWN)
    from pneumoscan.modeling import artifact
    from pneumoscan.commands import export

    out = export.export_onnx(artifact.resolve(args.model), args.out, opset=args.opset)
    print(f"onnx: {out}")
    return 0
