"""Command line: argument parsing only; each command calls one library function.

Every command is an ``add_X`` (its parser) / ``cmd_X`` (its run) pair, grouped by what it works
on: ``train_commands`` (train, cv, experiments, ensemble, compare), ``model_commands`` (explore,
evaluate, robustness, predict, explain, adapt, export), ``serve_command`` and ``node_command``. Mistakes in the input (missing folders, unreadable images, unknown names) end with one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pneumoscan import __version__
from pneumoscan.cli import console
from pneumoscan.cli.common import _Formatter, apply_outside_population
from pneumoscan.cli.model_commands import (add_adapt, add_evaluate, add_explain, add_explore, add_export, add_predict,
                                           add_robustness)
from pneumoscan.cli import pilot as pilot_cli
from pneumoscan.cli.node_command import add_node
from pneumoscan.cli.serve_command import add_serve
from pneumoscan.cli.train_commands import add_compare, add_cv, add_ensemble, add_experiments, add_train
from pneumoscan.core.errors import UserError

DESCRIPTION = """\
pneumoscan: pneumonia detection in chest X-rays (NORMAL vs PNEUMONIA).

A screening aid and second opinion, not a diagnosis. Typical use:
  pneumoscan explore  --data chest_xray --out explore/
  pneumoscan train    --data chest_xray --backbone-weights mobilenet_v2_imagenet.pth
  pneumoscan evaluate --model runs/RUN/model.pt --data chest_xray --out eval/ --report
  pneumoscan compare  runs/
  pneumoscan predict  --model runs/RUN/model.pt new_images/ --out predictions.csv

Data layout: DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|jpg|png|dcm (any split may be
missing), or simply DIR/{NORMAL,PNEUMONIA}/. Label 0 = NORMAL, 1 = PNEUMONIA.
"""


COMMANDS = (add_explore, add_train, add_cv, add_evaluate, add_robustness, add_predict, add_explain, add_adapt,
            add_compare, add_experiments, add_ensemble, add_export, add_serve, add_node, *pilot_cli.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure_logging(args.verbose, timestamps=getattr(args, "log_timestamps", False))
    from pneumoscan.core.logpolicy import capture_decoder_warnings

    try:
        apply_outside_population(args)
        with capture_decoder_warnings(every=False):  # decoder warnings quote attribute values: codes only
            return args.func(args)
    except UserError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
