"""The ``serve`` command: the REST API and page under uvicorn, and a prompt exit after Ctrl+C."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pneumoscan.cli.common import ENGINES, add_outside_population, add_parser, log
from pneumoscan.core.errors import UserError


def add_serve(sub) -> None:
    from pneumoscan.serve import settings
    from pneumoscan.io.budget import DEFAULT_DECODE_BUDGET_BYTES, DEFAULT_TOTAL_DECODE_BYTES
    from pneumoscan.serve.settings import API_KEY_ENV, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

    p = add_parser(sub, "serve", "REST API and web page for radiologists",
                   "Serve the model over HTTP: a web page at / (drop X-rays or DICOMs, see scores, Grad-CAM "
                   "overlays and a worklist sorted by probability), the REST API under /v1 and its docs at "
                   f"/docs. Works offline. Set ${API_KEY_ENV} to require an X-API-Key header on the API.")
    p.add_argument("--model", help="model.pt or exported .onnx [the bundled model]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="per file")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per image, read from its header")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="runtime for scores")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable); none by default")
    p.add_argument("--micro-batch", type=int, default=settings.DEFAULT_MICRO_BATCH, metavar="N",
                   help="images per model call when requests queue up; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=settings.DEFAULT_MAX_WAIT_MS,
                   help="how long a batch waits to fill")
    p.add_argument("--queue-size", type=int, default=settings.DEFAULT_QUEUE_SIZE,
                   help="requests waiting to be scored before new ones get 503 busy")
    p.add_argument("--score-timeout", type=float, default=settings.DEFAULT_SCORE_TIMEOUT_S, metavar="S",
                   help="seconds a request may wait for its score before a 504")
    p.add_argument("--db", metavar="URL", help="result store whose studies the page and /v1/studies list (those the "
                   "DICOM node scored): a SQLite file (sqlite:///pneumoscan.db or a path) or postgresql://...; "
                   "none by default")
    g = p.add_argument_group("hostile and slow clients")
    g.add_argument("--header-timeout", type=float, default=settings.DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                   help="seconds for a request's head to arrive (half a head: 408 and closed; nothing: closed)")
    g.add_argument("--body-timeout", type=float, default=settings.DEFAULT_BODY_TIMEOUT_S, metavar="S",
                   help="seconds for a request's body to arrive once its head has (else 408 and closed)")
    g.add_argument("--keep-alive", type=float, default=settings.DEFAULT_KEEP_ALIVE_S, metavar="S",
                   help="seconds an idle keep-alive connection stays open")
    g.add_argument("--max-connections", type=int, default=settings.DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; a new one beyond evicts the longest idle (kept under the open-file limit)")
    g.add_argument("--max-in-flight", type=int, default=settings.DEFAULT_MAX_IN_FLIGHT, metavar="N",
                   help="requests handled at once; beyond, 503 with Retry-After")
    g.add_argument("--grace-seconds", type=float, default=settings.DEFAULT_GRACE_S, metavar="S",
                   help="on SIGTERM/Ctrl+C, how long requests in flight may take to finish (then 503); exit 0")
    g.add_argument("--decode-budget-mb", type=float, default=DEFAULT_DECODE_BUDGET_BYTES / 2**20, metavar="MB",
                   help="memory one image's decoding may take, estimated from its header (over it: 413)")
    g.add_argument("--decode-total-mb", type=float, default=DEFAULT_TOTAL_DECODE_BYTES / 2**20, metavar="MB",
                   help="memory all concurrent decodes may take together (later ones wait)")
    add_outside_population(p)
    p.set_defaults(func=cmd_serve, log_timestamps=True)  # a server's log is read later: every line is dated


def cmd_serve(args: argparse.Namespace) -> int:
    from pneumoscan.io import budget
    from pneumoscan.serve import server, settings
    from pneumoscan.serve.app import create_app
    from pneumoscan.serve.batcher import BatchSettings
    from pneumoscan.serve.logqueue import queued_logging
    from pneumoscan.core.logpolicy import capture_decoder_warnings

    try:
        batching = BatchSettings(args.micro_batch, args.max_wait_ms, args.queue_size, args.score_timeout)
    except ValueError:
        raise UserError("--micro-batch and --queue-size must be at least 1, --max-wait-ms at least 0 and "
                        "--score-timeout positive") from None
    timeouts = (args.header_timeout, args.body_timeout, args.keep_alive, args.grace_seconds)
    if min(timeouts) <= 0 or min(args.max_connections, args.max_in_flight) < 1 or \
            min(args.decode_budget_mb, args.decode_total_mb) <= 0:
        raise UserError("timeouts, --grace-seconds and decode budgets must be positive; --max-connections and "
                        "--max-in-flight at least 1")
    budget.configure(int(args.decode_budget_mb * settings.MiB), int(args.decode_total_mb * settings.MiB))
    app = create_app(args.model, max_upload_bytes=int(args.max_upload_mb * settings.MiB),
                     max_pixels=args.max_pixels, engine=args.engine, cors_origins=args.cors_origin,
                     batching=batching, max_in_flight=args.max_in_flight, body_timeout_s=args.body_timeout,
                     db=args.db)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(settings.API_KEY_ENV):
        log.warning("listening on %s without an API key: anyone who can reach this port can use it "
                    "(set %s)", args.host, settings.API_KEY_ENV)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"pneumoscan: open http://{shown}:{args.port}/ in a browser (API docs at /docs); Ctrl+C stops",
          file=sys.stderr)
    # access_log off: the app logs method, path, status, latency and size, and nothing else;
    # through a queue, so a slow reader of the log never stalls the event loop.
    # On SIGTERM / Ctrl+C requests still running get --grace-seconds to finish, then 503 (serve.server).
    limits = server.ServerSettings(args.header_timeout, args.keep_alive, args.max_connections, args.grace_seconds)
    with queued_logging(), capture_decoder_warnings():
        server.serve(app, args.host, args.port, limits)
    if getattr(app.state, "service", None) is not None:  # it really served (startup ran) and has shut down
        exit_now(0)
    return 0


def exit_now(code: int) -> None:
    """End a server that has shut down without the interpreter's teardown.

    Freeing torch, torchvision and the grad-cam stack module by module takes about a second on two
    cores (more on a loaded machine) after uvicorn has already said "Finished server process", so
    Ctrl+C seemed to hang. Nothing is left to clean up: the model is read-only, every output was
    written atomically, and the log is flushed here; so the process leaves at once.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
