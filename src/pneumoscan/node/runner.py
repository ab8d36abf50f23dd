"""``pneumoscan node``: the listener, the scoring loop and the delivery loop, in one process.

Three kinds of threads: pynetdicom's (receive and spool, nothing else, so acknowledging never
waits for the model or a slow PACS), one scoring loop (``pipeline``) and one delivery loop
(outbox -> destinations). On start, claims this node left unfinished are released, spooled
files are picked up and the outbox is delivered: a restart repeats work, never loses it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from pneumoscan import store as st
from pneumoscan.node import delivery, receiver
from pneumoscan.node.config import Destination, NodeConfig
from pneumoscan.node.delivery import Outbox, Outcome
from pneumoscan.node.pipeline import Pipeline
from pneumoscan.node.scoring import Scorer
from pneumoscan.node.spool import Spool

log = logging.getLogger(__name__)


DELIVERY_BATCH = 32
CHATTY = ("pynetdicom", "highdicom", "alembic")  # their INFO/DEBUG lines quote UIDs and dataset details


def quiet_libraries() -> None:
    """Keep third-party lines that can quote DICOM values out of the node's log: warnings only."""
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def default_worker(cfg: NodeConfig) -> str:
    """Stable across restarts of the same node, so its own stale claims can be released."""
    return f"{socket.gethostname()}:{cfg.ae_title}:{cfg.port}:{Path(cfg.spool).resolve()}"[:200]


def delivery_recorder(store: st.Store):
    """``record(meta, destination, outcome)``: a delivery's final outcome into the store
    (study-level SRs have no result row, so only their log line tells)."""

    def record(meta: dict, dest: Destination, outcome: Outcome) -> None:
        if meta.get("result_id") is None:
            return
        try:
            store.record_delivery(meta["result_id"], dest.name, dest.store_kind,
                                  state=st.DELIVERED if outcome.ok else st.DEAD, error=outcome.reason or None)
        except st.StoreError as exc:
            log.error("delivery outcome not recorded: %s", exc)

    return record


class Node:
    def __init__(self, cfg: NodeConfig, scorer: Scorer | None = None, store: st.Store | None = None) -> None:
        quiet_libraries()
        cfg.worker = cfg.worker or default_worker(cfg)
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.outbox = Outbox(cfg.spool)
        self.store = store or st.Store.open(cfg.db_url())
        self.scorer = scorer or Scorer.load(cfg.model, cfg.engine, cfg.threshold, with_cam=cfg.secondary_capture)
        self.pipeline = Pipeline(cfg, self.spool, self.outbox, self.scorer, self.store)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.ae = self.server = None
        self.record = delivery_recorder(self.store)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else self.cfg.port

    def start(self) -> "Node":
        released = self.store.release_claims(self.cfg.worker)
        if released:
            log.info("released %d film(s) this node had claimed before it stopped", released)
        recovered = self.outbox.recover()
        if recovered:
            log.info("%d result object(s) staged before a stop will be delivered", recovered)
        self.ae, self.server = receiver.start(self.cfg, self.spool)
        for name, target in (("score", self.pipeline.run), ("deliver", self._deliver_loop)):
            thread = threading.Thread(target=target, args=(self.stop_event,), name=f"node-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("DICOM node %s listening on %s:%d (spool %s)", self.cfg.ae_title, self.cfg.host, self.port,
                 self.cfg.spool)
        return self

    def stop(self) -> None:
        """Stop accepting associations, give open ones ``grace_seconds`` to finish, abort the rest
        (what they had not been acknowledged is theirs to send again; every acknowledged instance
        is already in the spool), then let scoring and delivery finish their round."""
        if self.server is not None:
            self.server.shutdown()  # the listening socket closes: no new association
        deadline = time.monotonic() + self.cfg.grace_seconds
        while self.ae is not None and self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop_event.set()
        self.pipeline.outbox_ready.set()
        if self.ae is not None:
            self.ae.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)
        self.scorer.close()
        self.store.close()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def shadow(self) -> bool:
        """Shadow mode (a store setting): results are stored, not sent."""
        try:
            return self.store.get_setting(st.SHADOW_MODE) == "on"
        except st.StoreError:
            return False

    def deliver_pending(self) -> int:
        """Deliver what the outbox holds, ``DELIVERY_BATCH`` objects per association."""
        pending = self.outbox.pending()
        if pending and self.shadow():
            for path in pending:
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
            return 0
        for start in range(0, len(pending), DELIVERY_BATCH):
            if self.stop_event.is_set():
                break
            delivery.deliver(self.outbox, pending[start:start + DELIVERY_BATCH], self.cfg, self.record)
        return len(pending)

    def _deliver_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pipeline.outbox_ready.clear()
            try:
                self.deliver_pending()
            except Exception:  # the object stays in the outbox for the next round
                log.exception("delivery round failed")
            self.pipeline.outbox_ready.wait(1.0)



def config_from_args(args) -> NodeConfig:
    from pneumoscan.core.errors import UserError
    from pneumoscan.node.config import check_ae, parse_destination, stow_destination

    if min(args.stable_seconds, args.grace_seconds) < 0 or min(args.max_associations, args.retries) < 1 \
            or not 0 < args.port < 65536:
        raise UserError("--stable-seconds and --grace-seconds must be >= 0, --max-associations and --retries >= 1, "
                        "--port 1-65535")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    dests = tuple(parse_destination(d) for d in args.send_to) + tuple(stow_destination(u) for u in args.stow)
    return NodeConfig(spool=Path(args.spool), ae_title=check_ae(args.ae_title), host=args.host, port=args.port,
                      allow=tuple(check_ae(a) for a in args.allow), stable_seconds=args.stable_seconds,
                      destinations=dests, secondary_capture=args.secondary_capture, db=args.db, model=args.model,
                      engine=args.engine, threshold=args.threshold, max_associations=args.max_associations,
                      grace_seconds=args.grace_seconds,
                      retries=args.retries, tls={"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca})


def run_cli(args) -> int:
    """Run until SIGINT/SIGTERM (or, with --resend, deliver the dead letters and exit)."""
    import signal
    import sys

    cfg = config_from_args(args)
    quiet_libraries()
    if args.resend:
        with st.Store.open(cfg.db_url()) as store:  # delivery only: no model, no listener
            ok, failed = delivery.resend(Outbox(cfg.spool), cfg, delivery_recorder(store))
        print(f"pneumoscan: resent {ok} result(s); {failed} still undeliverable (kept in {cfg.spool}/deadletter)",
              file=sys.stderr)
        return 0 if not failed else 1
    from pneumoscan.core.logpolicy import capture_decoder_warnings

    with capture_decoder_warnings():  # decoder warnings quote values: codes and counts only
        node = Node(cfg)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            node.start()
        except OSError as exc:
            node.stop()
            from pneumoscan.core.errors import UserError

            raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})") from None
        print(f"pneumoscan: DICOM node {cfg.ae_title} on {cfg.host}:{node.port}; Ctrl+C stops", file=sys.stderr)
        stop.wait()
        node.stop()
    return 0
