"""The ``serve`` command: the REST API and page under uvicorn, and a prompt exit after Ctrl+C."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pneumoscan.cli.common import ENGINES, add_parser, log
from pneumoscan.core.errors import UserError


def add_serve(sub) -> None:
    from pneumoscan.serve import settings
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
    p.set_defaults(func=cmd_serve, log_timestamps=True)  # a server's log is read later: every line is dated


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pneumoscan.serve import settings
    from pneumoscan.serve.app import create_app
    from pneumoscan.serve.batcher import BatchSettings
    from pneumoscan.serve.logqueue import queued_logging

    try:
        batching = BatchSettings(args.micro_batch, args.max_wait_ms, args.queue_size, args.score_timeout)
    except ValueError:
        raise UserError("--micro-batch and --queue-size must be at least 1, --max-wait-ms at least 0 and "
                        "--score-timeout positive") from None
    app = create_app(args.model, max_upload_bytes=int(args.max_upload_mb * settings.MiB),
                     max_pixels=args.max_pixels, engine=args.engine, cors_origins=args.cors_origin,
                     batching=batching)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(settings.API_KEY_ENV):
        log.warning("listening on %s without an API key: anyone who can reach this port can use it "
                    "(set %s)", args.host, settings.API_KEY_ENV)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"pneumoscan: open http://{shown}:{args.port}/ in a browser (API docs at /docs); Ctrl+C stops",
          file=sys.stderr)
    # access_log off: the app logs method, path, status, latency and size, and nothing else;
    # through a queue, so a slow reader of the log never stalls the event loop.
    # timeout_graceful_shutdown: after Ctrl+C, requests still running get this long to finish (uvicorn's
    # default is to wait for every open connection, however long a client keeps it busy).
    with queued_logging():
        uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=None, server_header=False,
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    if getattr(app.state, "service", None) is not None:  # it really served (startup ran) and has shut down
        exit_now(0)
    return 0


SHUTDOWN_GRACE_S = 1


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
