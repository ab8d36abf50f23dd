"""CLI of the silent pilot: ``site-report``, ``monitor``, ``reads import`` and ``shadow`` (and
``adapt --db``, wired in app.py). The work is in ``commands.pilot``; this parses and prints."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from pneumoscan.core.errors import UserError

DB_HELP = "the result store: a SQLite file (sqlite:///pneumoscan.db or a path) or postgresql://..."


def _parser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description)


def add_site_report(sub) -> None:
    p = _parser(sub, "site-report", "what the model did on this site's films that radiologists read",
                "Writes DIR/report.html (self-contained), site_report.json and site_report.md: n, prevalence, "
                "accuracy, sensitivity, specificity, PPV, NPV, ROC-AUC and ECE against the readers' labels, each with "
                "a 95% CI from a bootstrap over patients; UNSURE and NOT_ASSESSED rates, confusion matrix, "
                "reliability diagram, ROC curve, by month and by device where there are enough films.")
    p.add_argument("--db", required=True, metavar="URL", help=DB_HELP)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", help="the model.pt whose results to report [the bundled model]")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.set_defaults(func=cmd_site_report)


def cmd_site_report(args) -> int:
    from pneumoscan.commands import pilot
    from pneumoscan.evaluation import site_report

    report = pilot.site_report(args.db, args.out, args.model, n_resamples=args.bootstrap)
    print(site_report.markdown(report, "result store"))
    print(f"report: {args.out}/report.html")
    return 0


def add_monitor(sub) -> None:
    p = _parser(sub, "monitor", "drift alerts over the most recent films (no labels needed)",
                "Compares the last N films the model scored with its validation films: EM prevalence with a 95% "
                "CI, mean probability, NOT_ASSESSED and UNSURE rates, OOD-score distribution (KS test). Exit "
                "status 1 when any check alerts (for cron or a monitoring system), 0 otherwise.")
    p.add_argument("--db", required=True, metavar="URL", help=DB_HELP)
    p.add_argument("--model", help="the model.pt whose results to watch [the bundled model]")
    p.add_argument("--window", type=int, default=200, metavar="N", help="how many recent films")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> int:
    from pneumoscan.commands import pilot
    from pneumoscan.evaluation import monitor

    if args.window < 10:
        raise UserError("--window must be at least 10 films")
    result = pilot.monitor(args.db, args.model, args.window)
    print(json.dumps(result, indent=1, default=str) if args.json else monitor.summary(result))
    return 1 if result["alert"] else 0


def add_reads(sub) -> None:
    p = _parser(sub, "reads", "radiologists' reads in the result store",
                "reads import FILE.csv: one read per row, matched by 'accession' or 'sop_instance_uid', with "
                "'label' NORMAL, PNEUMONIA or NOT_ASSESSABLE (optional 'comment', 'reader'); a later read corrects "
                "an earlier one and the history is kept.")
    p.add_argument("action", choices=["import"])
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument("--db", required=True, metavar="URL", help=DB_HELP)
    p.add_argument("--reader", default=None, help="who read them, when the CSV has no 'reader' column [login name]")
    p.set_defaults(func=cmd_reads)


def cmd_reads(args) -> int:
    from pneumoscan.commands import pilot

    result = pilot.import_reads(args.db, args.file, args.reader or getpass.getuser())
    print(f"{result['added']} reads recorded; {result['unknown']} rows matched no film or study")
    if result["bad_label_lines"]:
        print(f"pneumoscan: warning: lines with an unknown label skipped: {result['bad_label_lines'][:20]}",
              file=sys.stderr)
    return 0


def add_shadow(sub) -> None:
    p = _parser(sub, "shadow", "switch shadow mode (silent pilot) on or off",
                "Shadow mode: results are stored but not sent to the PACS nor shown before the read. The switch is "
                "recorded in the store's settings log (who, when); the node and serve read it.")
    p.add_argument("state", choices=["on", "off"])
    p.add_argument("--db", required=True, metavar="URL", help=DB_HELP)
    p.add_argument("--by", default=None, help="who switches it [login name]")
    p.set_defaults(func=cmd_shadow)


def cmd_shadow(args) -> int:
    from pneumoscan.commands import pilot

    print(f"shadow mode {pilot.set_shadow(args.db, args.state == 'on', args.by or getpass.getuser())}")
    return 0


def adapt_from_db(args) -> int:
    """``adapt --db URL --out M2 [--sensitivity-floor F]``."""
    from pneumoscan.commands import pilot
    from pneumoscan.evaluation import recalibrate

    if args.images or args.labels or args.train_prior is not None:
        raise UserError("--db re-fits on the store's read films: it excludes --images, --labels and --train-prior")
    result = pilot.adapt_from_reads(args.db, args.out, args.model, floor=args.sensitivity_floor,
                                    n_resamples=args.bootstrap)
    print(recalibrate.summary(result))
    print(f"new model version {result['version']} (sha256 {result['sha256'][:12]}, parent "
          f"{result['parent_sha256'][:12]}) registered in the store: {result['out']}")
    return 0


COMMANDS = (add_site_report, add_monitor, add_reads, add_shadow)
