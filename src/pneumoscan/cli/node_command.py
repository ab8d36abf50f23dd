"""The ``node`` command: the DICOM node that receives films from a PACS and sends results back."""

from __future__ import annotations

import argparse

from pneumoscan.cli.common import ENGINES, add_outside_population, add_parser


def add_node(sub) -> None:
    p = add_parser(sub, "node", "DICOM node: receive films from a PACS, send results back (SR, optional SC)",
                   "Listens for C-STORE/C-ECHO (CR and DX scored; DX for processing, CT and Secondary Capture recorded "
                   "as not scored), spools each instance durably before acknowledging it, scores a study once it is "
                   "stable, records everything in the store and sends a DICOM SR per film (and a Grad-CAM Secondary "
                   "Capture with --secondary-capture) to --send-to / --stow. See docs/pacs.md and "
                   "docs/dicom_conformance.md.")
    p.add_argument("--spool", default="pneumoscan-node", help="folder for received instances, outbox, dead letters")
    p.add_argument("--ae-title", default="PNEUMOSCAN", help="this node's AE title")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=11112, help="DICOM port")
    p.add_argument("--allow", action="append", default=[], metavar="AE", help="calling AE title to accept "
                   "(repeatable); others are refused at association [any]")
    p.add_argument("--send-to", action="append", default=[], metavar="AE@HOST:PORT", help="C-STORE results here (repeatable)")
    p.add_argument("--stow", action="append", default=[], metavar="URL", help="STOW-RS results to this DICOMweb URL")
    p.add_argument("--stable-seconds", type=float, default=3.0, help="score a study this long after its last instance")
    p.add_argument("--secondary-capture", action="store_true", help="also send a Grad-CAM SC (needs a model.pt)")
    p.add_argument("--db", help="store URL (sqlite:///FILE or postgresql://...) [SPOOL/node.db]")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="runtime for scores")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--tls-cert", help="PEM certificate: DICOM over TLS")
    p.add_argument("--tls-key", help="its PEM key")
    p.add_argument("--tls-ca", help="PEM CA bundle: require client certificates signed by it")
    p.add_argument("--max-associations", type=int, default=8, help="concurrent associations")
    p.add_argument("--grace-seconds", type=float, default=10.0, metavar="S",
                   help="on SIGTERM/Ctrl+C: no new association; open ones may finish this long, then are aborted")
    p.add_argument("--retries", type=int, default=3, help="delivery attempts before a dead letter")
    p.add_argument("--resend", action="store_true", help="deliver the dead letters again, then exit")
    add_outside_population(p)
    p.set_defaults(func=cmd_node, log_timestamps=True)


def cmd_node(args: argparse.Namespace) -> int:
    from pneumoscan.node.runner import run_cli

    return run_cli(args)
