"""End to end with Debian's Orthanc as the PACS: films go in with storescu, Orthanc forwards them
to ``pneumoscan node`` processes, results come back into Orthanc."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_films import chest_film, sample_jpegs, save, sr_items
from servers import NodeProcess, Orthanc, cli_env, free_port, wait_for
from pneumoscan.commands.predict import predict_files
from pneumoscan.store import Store

pytestmark = pytest.mark.slow
PLANTED = "LEAKTEST^PATIENT"
if not (Path("/usr/sbin/Orthanc").exists() and shutil.which("storescu")):
    pytest.skip("Orthanc or DCMTK missing: apt-get install -y orthanc dcmtk", allow_module_level=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("orthanc_e2e")


@pytest.fixture(scope="module")
def orthanc(work):
    server = Orthanc(work / "orthanc")
    yield server
    server.close()


def connect(orthanc: Orthanc, name: str, node: NodeProcess) -> None:
    orthanc.put_modality(name, "PNEUMOSCAN", node.port)


@pytest.fixture(scope="module")
def node(work, orthanc):
    proc = NodeProcess(work / "node", "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--stable-seconds",
                       "1", "--secondary-capture", "--allow", "ORTHANC")
    connect(orthanc, "node", proc)
    yield proc
    proc.close()


def films(folder: Path, *specs: dict) -> list[Path]:
    """Films of one study with the planted identifier in every identifying text attribute."""
    study = pydicom.uid.generate_uid()
    paths = []
    for i, spec in enumerate(specs):
        ds = chest_film(sample_jpegs(i + 1)[i], study_uid=study, patient=PLANTED, identifier="LEAKTEST",
                        instance=i + 1, **spec)
        paths.append(save(ds, folder / f"{study[-8:]}-{i}.dcm"))
    return paths


def uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SOPInstanceUID


def test_sr_and_sc_arrive_with_predicts_probability(work, orthanc, node):
    (path,) = films(work / "in", {})
    study, sop = uids(path)
    orthanc.storescu(path)
    orthanc.forward("node", sop)
    (sr,) = wait_for(lambda: orthanc.instances_of(study, "SR"), "the SR in Orthanc")
    (sc,) = wait_for(lambda: orthanc.instances_of(study, "OT"), "the SC in Orthanc")
    expected = predict_files(None, [path])[0][0]
    items = sr_items(sr)
    assert items["Probability of pneumonia"] == pytest.approx(expected.probability, abs=1e-12)
    assert items["AI screening label"] == expected.label
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID


def test_resent_film_gives_no_duplicate(work, orthanc, node):
    (path,) = films(work / "again", {})
    study, sop = uids(path)
    orthanc.storescu(path)
    orthanc.forward("node", sop)
    wait_for(lambda: orthanc.instances_of(study, "SR"), "the first SR")
    orthanc.forward("node", sop)  # the PACS sends the same film again
    spool = work / "node" / "spool" / "incoming"
    wait_for(lambda: not list(spool.glob("*/*.dcm")), "the repeat handled")
    with Store.open(node.db) as store:
        (film,) = store.study_by_uid(study).films
    assert len(film.results) == 1 and len(orthanc.instances_of(study, "SR")) == 1


def test_lateral_and_ct_are_not_scored_and_say_why(work, orthanc, node):
    paths = films(work / "notscored", {"view": "LL"}, {"modality": "CT"})
    study = uids(paths[0])[0]
    orthanc.storescu(*paths)
    orthanc.forward("node", *(uids(p)[1] for p in paths))
    (sr,) = wait_for(lambda: orthanc.instances_of(study, "SR"), "the study's SR")
    texts = " ".join(sr_items(sr)["Instance not scored"])
    assert "lateral view" in texts and "CT Image Storage" in texts
    with Store.open(node.db) as store:
        reasons = sorted(f.not_scored_reason for f in store.study_by_uid(study).films)
    assert "CT Image Storage" in reasons[0] and "lateral view" in reasons[1]


def test_unreachable_destination_dead_letter_then_resend(work, orthanc):
    port = free_port()  # nothing listens here yet
    folder = work / "deadletter"
    proc = NodeProcess(folder, "--send-to", f"LATER@127.0.0.1:{port}", "--stable-seconds", "1", "--retries", "2")
    try:
        connect(orthanc, "dl", proc)
        (path,) = films(work / "dl", {})
        study, sop = uids(path)
        orthanc.storescu(path)
        orthanc.forward("dl", sop)
        wait_for(lambda: list((folder / "spool" / "deadletter").glob("*.dcm")), "a dead letter")
    finally:
        proc.close()
    later = Orthanc(work / "later", aet="LATER", dicom_port=port)
    try:
        out = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "node", "--resend", "--spool",
                              str(folder / "spool"), "--db", proc.db], capture_output=True, text=True, env=cli_env(),
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert len(later.instances_of(study, "SR")) == 1
        assert not list((folder / "spool" / "deadletter").glob("*.dcm"))
    finally:
        later.close()


def test_killed_node_scores_acknowledged_film_after_restart(work, orthanc):
    folder = work / "killed"
    dest = ("--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    proc = NodeProcess(folder, *dest, "--stable-seconds", "3600")  # would wait an hour
    connect(orthanc, "killed", proc)
    (path,) = films(work / "k", {})
    study, sop = uids(path)
    orthanc.storescu(path)
    orthanc.forward("killed", sop)  # returns once the node acknowledged
    proc.kill()
    assert list((folder / "spool" / "incoming").glob("*/*.dcm"))
    again = NodeProcess(folder, *dest, "--stable-seconds", "1", port=proc.port)
    try:
        wait_for(lambda: orthanc.instances_of(study, "SR"), "the SR after the restart")
    finally:
        again.close()


DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def test_stow_rs_delivery(work):
    if not DICOMWEB.exists():
        pytest.skip("Orthanc's DICOMweb plug-in missing: apt-get install -y orthanc-dicomweb")
    web = Orthanc(work / "web", aet="WEB", plugins=[str(DICOMWEB)])
    proc = None
    try:
        proc = NodeProcess(work / "stow", "--stow", f"http://127.0.0.1:{web.http_port}/dicom-web",
                           "--stable-seconds", "1")
        connect(web, "stow", proc)
        (path,) = films(work / "st", {})
        study, sop = uids(path)
        web.storescu(path)
        web.forward("stow", sop)
        (sr,) = wait_for(lambda: web.instances_of(study, "SR"), "the SR through STOW-RS")
        assert sr_items(sr)["Probability of pneumonia"] == pytest.approx(predict_files(None, [path])[0][0].probability,
                                                                         abs=1e-12)
    finally:
        if proc is not None:
            proc.close()
        web.close()


def test_no_identifier_in_any_node_log(work, orthanc, node):
    """Every film above carried the planted name and identifier; no node line may quote them."""
    node.close()
    logs = list(work.rglob("node-*.log"))
    assert logs
    for log in logs:
        text = log.read_text()
        assert "LEAKTEST" not in text, f"{log.name} quotes a planted identifier"
