"""Two ``pneumoscan node`` processes on one PostgreSQL: both receive the same films, each film is
scored once and its SR sent once (the store's claims: FOR UPDATE SKIP LOCKED)."""

from __future__ import annotations

import pydicom
import pytest
from pynetdicom import AE

from dicom_films import chest_film, sample_jpegs, save
from servers import NodeProcess, wait_for
from pneumoscan.store import Store
from test_node import Pacs

pytestmark = pytest.mark.slow
N_FILMS = 6


def send(port: int, datasets: list[pydicom.Dataset]) -> None:
    ae = AE("MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()


def test_two_nodes_one_database_score_and_send_each_film_once(tmp_path, postgres_url):
    studies = [pydicom.uid.generate_uid() for _ in range(2)]
    datasets = [pydicom.dcmread(save(chest_film(jpeg, study_uid=studies[i % 2], instance=i + 1),
                                     tmp_path / "in" / f"{i}.dcm"))
                for i, jpeg in enumerate(sample_jpegs(N_FILMS))]
    pacs = Pacs()
    nodes = []
    try:
        for name in ("a", "b"):
            nodes.append(NodeProcess(tmp_path / name, "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--stable-seconds",
                                     "1", db=postgres_url))
        for node in nodes:  # each node receives every film: the worst case for double work
            send(node.port, datasets)
        pacs.wait(N_FILMS)
        with Store.open(postgres_url) as store:
            def done():
                films = [f for s in studies for f in store.study_by_uid(s).films]
                finished = all(f.state == "scored" and f.results and f.results[0].deliveries
                               and f.results[0].deliveries[0].state == "delivered" for f in films)
                return films if finished and len(films) == N_FILMS else None

            films = wait_for(done, "every film scored and delivered")
        wait_for(lambda: not any(any((tmp_path / n / "spool" / "incoming").glob("*/*.dcm")) for n in "ab"),
                 "both spools emptied")
    finally:
        for node in nodes:
            node.close()
        pacs.close()
    sent = [ds.SOPInstanceUID for ds in pacs.received]
    assert len(sent) == N_FILMS == len(set(sent))  # no SR twice
    assert all(len(f.results) == 1 and len(f.results[0].deliveries) == 1 for f in films)
