"""The DICOM node with real parts: a node in this process on a free port, pynetdicom as the
sending modality and as the receiving PACS, the bundled model, a SQLite store in tmp_path."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_films import CLASSES, chest_film, sample_jpegs, save
from dicom_films import sr_items as items
from servers import wait_for
from pneumoscan.commands.predict import predict_files
from pneumoscan.node import results, selection, spool
from pneumoscan.node.config import Destination, NodeConfig
from pneumoscan.node.runner import Node
from pneumoscan.node.scoring import Scorer
from pneumoscan.safety.decision import Verdict

WAIT_S = 60  # generous upper bound on a loaded machine; tests wait for events, never assert times


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.load(None)  # the bundled model (its shipped ONNX export)


class Pacs:
    """A receiving peer: pynetdicom's real SCP collecting what it is sent."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[pydicom.Dataset] = []
        self.ae = AE("PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    def wait(self, n: int) -> list[pydicom.Dataset]:
        deadline = time.monotonic() + WAIT_S
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= n, f"{len(self.received)} of {n} objects arrived"
        return self.received

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs():
    p = Pacs()
    yield p
    p.close()


def until(check, what: str):
    """Wait for ``check()`` to be truthy (events, not the clock, decide; WAIT_S only bounds a hang)."""
    return wait_for(check, what, timeout=WAIT_S, interval=0.05)


def delivered(node: Node, study_uid: str) -> list:
    films = node.store.study_by_uid(study_uid).films
    return films if all(d.state != "pending" for f in films for r in f.results for d in r.deliveries) else []


def make_node(tmp_path: Path, scorer: Scorer, dests=(), **kwargs) -> Node:
    cfg = NodeConfig(spool=tmp_path / "spool", port=0, stable_seconds=kwargs.pop("stable_seconds", 0.3),
                     destinations=tuple(dests), retries=kwargs.pop("retries", 2), backoff_s=0.05, **kwargs)
    return Node(cfg, scorer=scorer)


def send(port: int, *datasets: pydicom.Dataset, calling: str = "MODALITY") -> list[int]:
    ae = AE(calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def film(tmp_path: Path, name: str = "film.dcm", **kwargs) -> pydicom.Dataset:
    """A film as a modality would send it: written, then read back."""
    ds = chest_film(kwargs.pop("jpeg", None) or sample_jpegs(1)[0], **kwargs)
    return pydicom.dcmread(save(ds, tmp_path / name))


# --- association ------------------------------------------------------------------------------

def test_echo_and_allow_list(tmp_path, scorer):
    with make_node(tmp_path, scorer, allow=("MODALITY",)) as node:
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        intruder = AE("INTRUDER")
        intruder.add_requested_context(Verification)
        refused = intruder.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert refused.is_rejected


def test_unsupported_sop_class_is_refused_at_association(tmp_path, scorer):
    with make_node(tmp_path, scorer) as node:
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CLASSES["MG"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assoc.release()
    assert CLASSES["MG"] not in accepted and Verification in accepted


# --- receiving --------------------------------------------------------------------------------

def test_instance_is_spooled_before_success(tmp_path, scorer):
    ds = film(tmp_path)
    with make_node(tmp_path, scorer, stable_seconds=3600) as node:  # never stable during the test
        assert send(node.port, ds) == [0x0000]
        files = node.spool.files()  # the status came back: the file must already be there, complete
        assert len(files) == 1
        assert pydicom.dcmread(files[0]).SOPInstanceUID == ds.SOPInstanceUID
        assert not list(files[0].parent.glob(".*.part"))


def test_full_disk_answers_out_of_resources(tmp_path, scorer, monkeypatch, caplog):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "durable_write", full)
    with make_node(tmp_path, scorer) as node:
        assert send(node.port, film(tmp_path)) == [0xA700]
    assert "disk full" in caplog.text


def test_unreadable_and_oversized_datasets_get_failure_statuses(tmp_path, scorer):
    no_uid = film(tmp_path, "nouid.dcm", pixels=np.zeros((16, 16), np.uint8))
    del no_uid.StudyInstanceUID
    with make_node(tmp_path, scorer, max_dataset_bytes=10_000) as node:
        big = film(tmp_path, "big.dcm")  # 256x256 pixels: over the 10 kB limit
        assert send(node.port, no_uid, big) == [0xC210, 0xA700]
        assert node.spool.files() == []


# --- selection --------------------------------------------------------------------------------

@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"view": ""}, None),
    ({"body_part": ""}, None),
    ({"view": "LL"}, "lateral view"),
    ({"modality": "CT"}, "SOP class CT Image Storage"),
    ({"modality": "CR", "sop_class": CLASSES["DX"]}, None),
    ({"body_part": "ABDOMEN"}, "body part ABDOMEN"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class Secondary Capture"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.1.1.1"}, "For Processing"),
])
def test_selection_reasons(change, reason):
    ds = chest_film(pixels=np.zeros((8, 8), np.uint8), **change)
    got = selection.reason_not_scored(ds)
    assert (got is None) if reason is None else (reason in got)


def test_selection_derived_multiframe_and_no_pixels():
    ds = chest_film(pixels=np.zeros((8, 8), np.uint8))
    ds.ImageType = ["DERIVED", "PRIMARY"]
    assert "derived" in selection.reason_not_scored(ds)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.NumberOfFrames = 3
    assert "multi-frame" in selection.reason_not_scored(ds)
    del ds.NumberOfFrames, ds.PixelData
    assert "no pixel data" in selection.reason_not_scored(ds)


# --- results ----------------------------------------------------------------------------------

def test_sr_uids_are_deterministic():
    ds = chest_film(pixels=np.full((8, 8), 100, np.uint8))
    v = Verdict(0.8, 1.4, "PNEUMONIA", 1, 0.5)
    a, b = results.Algorithm("m", "0.1.0", "a" * 64), results.Algorithm("m", "0.1.0", "b" * 64)
    assert results.film_sr(ds, v, a).SOPInstanceUID == results.film_sr(ds, v, a).SOPInstanceUID
    assert results.film_sr(ds, v, a).SOPInstanceUID != results.film_sr(ds, v, b).SOPInstanceUID


def test_sr_arrives_with_predicts_probability(tmp_path, scorer, pacs):
    ds = film(tmp_path, jpeg=sample_jpegs(2)[1], patient="DOE^JANE")
    with make_node(tmp_path, scorer, [Destination("dicom", "PACS", "127.0.0.1", pacs.port)]) as node:
        assert send(node.port, ds) == [0]
        sr = pacs.wait(1)[0]
        films = until(lambda: delivered(node, ds.StudyInstanceUID), "delivery recorded")
    expected = predict_files(None, [tmp_path / "film.dcm"])[0][0]
    content = items(sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert content["Probability of pneumonia"] == pytest.approx(expected.probability, abs=1e-12)
    assert content["AI screening label"] == expected.label
    assert content["Decision threshold"] == pytest.approx(expected.threshold, abs=1e-12)
    assert f"model_sha256={scorer.engine.sha256}" in content["Algorithm Parameters"]
    assert "AI screening aid, not a diagnosis" in content["Note"]
    assert sr.PatientName == "DOE^JANE" and sr.StudyInstanceUID == ds.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sr.SOPInstanceUID == results.result_uid(ds.SOPInstanceUID, scorer.engine.sha256, "sr")
    (f,) = films
    assert f.state == "scored" and f.results[0].probability == pytest.approx(expected.probability)
    assert [d.state for d in f.results[0].deliveries] == ["delivered"]


def test_resent_film_gives_no_second_result(tmp_path, scorer, pacs):
    ds = film(tmp_path)
    with make_node(tmp_path, scorer, [Destination("dicom", "PACS", "127.0.0.1", pacs.port)]) as node:
        send(node.port, ds)
        pacs.wait(1)
        send(node.port, ds)
        until(lambda: not node.spool.files(), "the repeat recognised and dropped")
        (f,) = node.store.study_by_uid(ds.StudyInstanceUID).films
    assert len(pacs.received) == 1 and len(f.results) == 1


def test_study_without_eligible_film_says_why(tmp_path, scorer, pacs):
    lateral = film(tmp_path, "lat.dcm", view="LL")
    ct = film(tmp_path, "ct.dcm", modality="CT", study_uid=lateral.StudyInstanceUID, instance=2)
    with make_node(tmp_path, scorer, [Destination("dicom", "PACS", "127.0.0.1", pacs.port)]) as node:
        assert send(node.port, lateral, ct) == [0, 0]
        sr = pacs.wait(1)[0]
        films = node.store.study_by_uid(lateral.StudyInstanceUID).films
    reasons = {f.sop_instance_uid: f.not_scored_reason for f in films}
    assert "lateral view" in reasons[lateral.SOPInstanceUID]
    assert "CT Image Storage" in reasons[ct.SOPInstanceUID]
    texts = " ".join(items(sr)["Instance not scored"])
    assert "lateral view" in texts and "CT Image Storage" in texts
    assert items(sr)["AI screening label"] == "NOT_SCORED"


@pytest.mark.slow  # a few seconds; make test runs it
def test_dead_letter_then_resend(tmp_path, scorer):
    closed = Pacs()
    port = closed.port
    closed.close()  # nothing listens there now
    ds = film(tmp_path)
    dest = Destination("dicom", "PACS", "127.0.0.1", port)
    with make_node(tmp_path, scorer, [dest]) as node:
        send(node.port, ds)
        (dead,) = until(node.outbox.dead, "a dead letter")
        assert node.outbox.note(dead)["reason"]
        (f,) = until(lambda: delivered(node, ds.StudyInstanceUID), "delivery recorded")
        assert f.results[0].deliveries[0].state == "dead"
        pacs = Pacs(port)
        try:
            from pneumoscan.node import delivery

            assert delivery.resend(node.outbox, node.cfg, node.record) == (1, 0)
            assert pacs.wait(1)[0].SOPInstanceUID == dead.name.split(".PACS")[0]
        finally:
            pacs.close()
        (f,) = node.store.study_by_uid(ds.StudyInstanceUID).films
        assert f.results[0].deliveries[0].state == "delivered" and node.outbox.dead() == []


def test_objects_staged_before_a_crash_are_delivered_at_start(tmp_path, scorer, pacs):
    from pneumoscan.node.delivery import Outbox

    ds = chest_film(pixels=np.full((64, 64), 90, np.uint8))
    sr = results.film_sr(ds, Verdict(0.2, -1.4, "NORMAL", 0, 0.5), scorer.algorithm)
    Outbox(tmp_path / "spool").stage(sr)  # scored, then the process died before recording it
    with make_node(tmp_path, scorer, [Destination("dicom", "PACS", "127.0.0.1", pacs.port)]):
        assert pacs.wait(1)[0].SOPInstanceUID == sr.SOPInstanceUID


def test_no_identifier_in_logs(tmp_path, scorer, pacs, caplog):
    caplog.set_level(logging.DEBUG)
    planted = "LEAKTEST^PATIENT"
    ds = film(tmp_path, patient=planted, identifier="LEAKTEST")
    with make_node(tmp_path, scorer, [Destination("dicom", "PACS", "127.0.0.1", pacs.port)]) as node:
        send(node.port, ds)
        pacs.wait(1)
    assert pacs.received[0].PatientName == planted  # it is in the result, as DICOM requires
    assert "LEAKTEST" not in caplog.text and ds.StudyInstanceUID not in caplog.text


def test_sr_passes_dciodvfy(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing: apt-get install -y dicom3tools")
    ds = chest_film(sample_jpegs(1)[0])
    v = Verdict(0.3, -0.8, "NOT_ASSESSED", None, 0.5, ("low_quality",), ("too small",), decided=False)
    path = tmp_path / "sr.dcm"
    results.film_sr(ds, v, results.Algorithm("m", "0.1.0", "a" * 64)).save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_tls(tmp_path, scorer):
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl missing: apt-get install -y openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    with make_node(tmp_path, scorer, tls={"cert": str(cert), "key": str(key), "ca": None}) as node:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN", tls_args=(client, "127.0.0.1"))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        plain = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")  # no TLS: no association
        assert not plain.is_established


@pytest.mark.parametrize("args, message", [
    (["--send-to", "ORTHANC@nowhere"], "expected AE@host:port"),
    (["--stow", "ftp://x"], "expected an http(s) URL"),
    (["--allow", "A" * 17], "1 to 16 printable ASCII"),
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
])
def test_cli_bad_options_get_one_line(args, message, capsys):
    from pneumoscan.cli.app import main

    assert main(["node", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_stop_lets_an_open_association_finish(tmp_path, scorer):
    """Graceful stop: no new association once stopping, but one already open may still store and
    release within the grace period; its instance is spooled and acknowledged."""
    node = make_node(tmp_path, scorer, grace_seconds=30).start()
    ds = film(tmp_path)
    ae = AE("MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
    assert assoc.is_established
    stopping = threading.Thread(target=node.stop)
    stopping.start()
    until(lambda: node.server.socket.fileno() == -1, "the listening socket to close")
    late = AE("LATE")
    late.add_requested_context(Verification)
    assert not late.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN").is_established
    assert stopping.is_alive()  # waiting for the open association
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    stopping.join(timeout=60)
    assert not stopping.is_alive()
    assert list((tmp_path / "spool").rglob("*.dcm")), "the acknowledged instance is in the spool"
