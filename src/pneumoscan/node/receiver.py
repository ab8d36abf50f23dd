"""The DICOM listener: C-ECHO, and C-STORE into the spool before the status goes back.

Accepted (``STORAGE``): CR and DX for presentation, which are scored; DX for processing, CT and
Secondary Capture, accepted only so each can be recorded with the reason it is not scored (a
PACS forwards whole studies). Anything else, e.g. Digital Mammography, is refused at
association (no presentation context). Calling AE titles outside ``--allow`` are refused at
association. Every wait has a timeout (ARTIM/ACSE, DIMSE, network), associations and PDUs are
capped, and a dataset over ``max_dataset_bytes`` is refused with 0xA700.

Statuses: 0x0000 stored; 0xA700 out of resources (disk full, spool unwritable, over the size
limit); 0xC210 cannot understand (a dataset that does not parse, or has no Study / SOP
Instance UID). Log lines name the status and the kind of failure, never an attribute value.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Callable

from pydicom import uid as uids

from pneumoscan.node.config import NodeConfig, tag
from pneumoscan.node.selection import CR, CT, DX_PRESENTATION, DX_PROCESSING, SC
from pneumoscan.node.spool import Spool

log = logging.getLogger(__name__)

STORAGE = (CR, DX_PRESENTATION, DX_PROCESSING, CT, SC)
SYNTAXES = (uids.ImplicitVRLittleEndian, uids.ExplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian,
            uids.ExplicitVRBigEndian, uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLossless,
            uids.JPEGLosslessSV1, uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.JPEG2000Lossless,
            uids.JPEG2000, uids.RLELossless)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """A server context from PEM files; with ``ca`` the peer must present a certificate it signed."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def store_handler(spool: Spool, cfg: NodeConfig) -> Callable:
    """The EVT_C_STORE handler: decode the identifiers, spool durably, then answer."""

    def handle(event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("C-STORE refused (0x%04X): dataset cannot be encoded (%s)", CANNOT_UNDERSTAND,
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        if len(data) > cfg.max_dataset_bytes:
            log.warning("C-STORE refused (0x%04X): %d bytes is over the %d-byte limit", OUT_OF_RESOURCES,
                        len(data), cfg.max_dataset_bytes)
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
            if not study or not sop:
                raise ValueError("empty UID")
        except Exception as exc:  # a truncated or corrupt dataset: the parser's text may quote values
            log.warning("C-STORE refused (0x%04X): unreadable dataset or no Study/SOP Instance UID (%s)",
                        CANNOT_UNDERSTAND, type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            spool.save(study, sop, data)
        except OSError as exc:
            why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else type(exc).__name__
            log.error("C-STORE refused (0x%04X): cannot write the spool (%s)", OUT_OF_RESOURCES, why)
            return OUT_OF_RESOURCES
        log.debug("stored an instance of study %s", tag(study))
        return SUCCESS

    return handle


def make_ae(cfg: NodeConfig):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.max_pdu
    ae.require_called_aet = True
    if cfg.allow:
        ae.require_calling_aet = list(cfg.allow)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE:
        ae.add_supported_context(sop_class, list(SYNTAXES))
    return ae


def start(cfg: NodeConfig, spool: Spool):
    """Listen in background threads; returns (ae, server)."""
    from pynetdicom import evt

    ae = make_ae(cfg)
    handlers = [(evt.EVT_C_STORE, store_handler(spool, cfg)), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                (evt.EVT_REJECTED, _rejected)]
    ctx = tls_context(cfg.tls.get("cert"), cfg.tls.get("key"), cfg.tls.get("ca"))
    server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers, ssl_context=ctx)
    return ae, server


def _rejected(event) -> None:
    log.warning("association from %s:%s rejected", *event.assoc.requestor.address[:2])
