"""The HTTP service: predictions, explanations, batches, every error code, auth, the page, privacy."""

from __future__ import annotations

import base64
import io
import logging
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import synthetic_xray
from pneumoscan.modeling import artifact
from pneumoscan.cli import app as cli
from pneumoscan.commands import predict
from pneumoscan.core.files import file_sha256
from pneumoscan.serve.app import create_app

MAX_BYTES = 64 * 1024
MAX_PIXELS = 200_000
KEY = "correct horse battery staple"
PATIENT = "Doe^Janet"
SECRET_NAME = "patient-DoeJanet-MRN7731904"


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def xray(label: int = 1, size: int = 96, seed: int = 0) -> np.ndarray:
    return synthetic_xray(np.random.default_rng(seed), label, size)


def dicom_bytes(pixels: np.ndarray, rows_cols: tuple[int, int] | None = None) -> bytes:
    """A Part-10 DX radiograph carrying a patient name that must never reach a log."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT, "MRN7731904", "DX"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows_cols or pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(trained_model):
    app = create_app(trained_model, max_upload_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_batch_files=5,
                     api_key=None)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(trained_model):
    app = create_app(trained_model, api_key=KEY, engine="torch", cors_origins=["http://ward.example"])
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def meta(trained_model):
    return artifact.read_meta(trained_model)


def post(c: TestClient, blob: bytes, name: str = "x.png", url: str = "/v1/predict", **kw):
    return c.post(url, files={"file": (name, blob, "application/octet-stream")}, **kw)


def assert_error(r, status: int, error: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and body["detail"], body
    return body


# --- happy paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_predict_matches_the_offline_scorer(client, trained_model, meta, tmp_path, fmt):
    blob = encode(xray(), fmt)
    (tmp_path / f"x.{fmt.lower()}").write_bytes(blob)
    (expected,), _ = predict.predict_files(trained_model, [tmp_path / f"x.{fmt.lower()}"])

    r = post(client, blob, name="whatever.bin")  # the name lies; the content decides
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-4)
    assert body["prediction"] == int(body["probability"] >= meta.threshold)
    assert body["label"] == meta.class_names[body["prediction"]]
    assert body["threshold"] == pytest.approx(meta.threshold)
    assert body["model"]["sha256"] == file_sha256(trained_model)
    assert body["model"]["name"] == meta.architecture
    assert "overlay_png_base64" not in body


def test_predict_dicom(client):
    pixels = xray(size=64)
    r = post(client, dicom_bytes(pixels), name="study")  # no suffix, as PACS exports often are
    assert r.status_code == 200, r.text
    png = post(client, encode(pixels, "PNG")).json()
    assert 0 <= r.json()["probability"] <= 1
    assert r.json()["label"] in ("NORMAL", "PNEUMONIA")
    # same pixels (8-bit, min-max display): the same score as the PNG within resampling noise
    assert r.json()["probability"] == pytest.approx(png["probability"], abs=0.05)


def test_explain_returns_decodable_overlay(client, meta):
    r = post(client, encode(xray(), "PNG"), params={"explain": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    image = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
    size = meta.image_size
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (size, size)
    assert image.mode == "L" and image.size == (size, size)
    rgb = np.asarray(overlay).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 10  # a colour map, not the gray image again
    # how to read it (issue 14): the scale, flatness and where the map's mass lies
    assert body["cam_scale"] == "absolute" and isinstance(body["cam_flat"], bool)
    if not body["cam_flat"]:
        assert 0 <= body["cam_outside_lungs"] <= 1 and 0 <= body["cam_on_border"] <= 1


def test_batch_keeps_order_and_reports_bad_files(client):
    good_a, good_b = encode(xray(0, seed=1), "PNG"), encode(xray(1, seed=2), "JPEG")
    files = [("files", ("a.png", good_a)), ("files", ("notes.png", b"not an image at all")),
             ("files", ("b.jpg", good_b)), ("files", ("empty.png", b"")),
             ("files", ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES))]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "notes.png", "b.jpg", "empty.png", "big.png"]
    assert [x.get("error") for x in results] == [None, "not_an_image", None, "empty_upload", "file_too_large"]
    assert [x.get("status") for x in results] == [None, 422, None, 422, 413]
    single = post(client, good_b).json()
    assert results[2]["probability"] == pytest.approx(single["probability"], abs=1e-6)
    assert r.json()["model"]["sha256"] == single["model"]["sha256"]


def test_batch_too_many_files(client):
    blob = encode(xray(), "PNG")
    r = client.post("/v1/predict/batch", files=[("files", (f"{i}.png", blob)) for i in range(6)])
    assert_error(r, 413, "too_many_files")


# --- errors ----------------------------------------------------------------------------------

def test_413_from_content_length_before_reading(client):
    r = post(client, b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * MAX_BYTES))
    body = assert_error(r, 413, "request_too_large")
    assert "MiB" in body["detail"]
    assert r.headers["x-content-type-options"] == "nosniff"  # even answers made before routing


def test_413_counted_while_reading_a_chunked_body(client):
    boundary = "pneumoscanboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():  # a generator body: no Content-Length, so only counting can stop it
        yield head
        for _ in range(4):
            yield b"\0" * MAX_BYTES
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/predict", content=chunks(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "request_too_large")


def test_413_file_over_limit_within_request_slack(client):
    r = post(client, b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES)  # over per-file, under per-request
    assert_error(r, 413, "file_too_large")


def test_413_too_many_pixels_png_from_header(client):
    big = np.zeros((500, 500), dtype=np.uint8)  # 250k pixels > 200k, a tiny file
    blob = encode(big, "PNG")
    assert len(blob) < MAX_BYTES
    assert_error(post(client, blob), 413, "too_many_pixels")


def test_413_too_many_pixels_dicom_from_header(client):
    # the header claims 1000 x 1000; the pixel data is never decoded, so its size does not matter
    blob = dicom_bytes(np.zeros((8, 8), dtype=np.uint8), rows_cols=(1000, 1000))
    assert_error(post(client, blob), 413, "too_many_pixels")


@pytest.mark.parametrize("blob, error", [
    (b"just some text, named like a PNG", "not_an_image"),
    (b"\xff\xd8\xff\xe0" + b"garbage" * 50, "not_an_image"),  # JPEG magic, corrupt body
    (b"GIF89a" + b"\0" * 100, "not_an_image"),  # a real format, not one we accept
    (b"", "empty_upload"),
])
def test_422_not_an_image(client, blob, error):
    assert_error(post(client, blob, name="x.png"), 422, error)


def test_422_missing_field(client):
    assert_error(client.post("/v1/predict", files={"image": ("x.png", b"abc")}), 422, "invalid_request")
    body = assert_error(client.post("/v1/predict"), 422, "invalid_request")
    assert "file" in body["detail"]


def test_api_key(keyed):
    blob = encode(xray(), "PNG")
    assert_error(post(keyed, blob), 401, "unauthorized")
    assert_error(post(keyed, blob, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert_error(keyed.get("/v1/model"), 401, "unauthorized")
    assert post(keyed, blob, headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200
    # open without a key: liveness, the page (it asks for the key) and its assets
    assert keyed.get("/v1/health").status_code == 200
    assert keyed.get("/").status_code == 200
    assert keyed.get("/static/app.js").status_code == 200


def test_api_key_from_environment(trained_model, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_API_KEY", KEY)
    app = create_app(trained_model)
    # no lifespan (no model load) needed: the key is checked before anything uses the model
    assert_error(TestClient(app).get("/v1/model"), 401, "unauthorized")


def test_cors_off_by_default_and_on_for_listed_origins(client, keyed):
    headers = {"Origin": "http://ward.example"}
    assert "access-control-allow-origin" not in client.get("/v1/health", headers=headers).headers
    r = keyed.get("/v1/health", headers=headers)
    assert r.headers["access-control-allow-origin"] == "http://ward.example"
    other = keyed.get("/v1/health", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


# --- health, model card, page, docs ----------------------------------------------------------

def test_health(client):
    assert client.get("/v1/health").json() == {"status": "ok", "model_loaded": True, "api_key_required": False,
                                            "result_store": False}


def test_health_says_a_key_is_needed_without_one(keyed):
    r = keyed.get("/v1/health")  # open without the key, so the page can ask for one only when needed
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model_loaded": True, "api_key_required": True, "result_store": False}


def test_model_card(client, meta, trained_model):
    card = client.get("/v1/model").json()
    assert card["architecture"] == meta.architecture
    assert card["image_size"] == meta.image_size
    assert card["threshold"] == pytest.approx(meta.threshold)
    assert card["threshold_rule"] == meta.threshold_rule
    assert card["temperature"] == pytest.approx(meta.temperature)
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert card["sha256"] == file_sha256(trained_model)
    assert card["training_data"]["n_train"] == meta.training.n_train
    assert "/" not in card["training_data"]["dataset"]  # a folder name, not the server's path
    assert "not a diagnosis" in card["intended_use"]
    assert any("single centre" in x for x in card["limitations"])
    assert card["service"]["max_upload_bytes"] == MAX_BYTES


EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}|@import|fonts\.g""", re.IGNORECASE)


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "Screening aid — not a diagnosis." in page.text
    assert "A radiologist must review every image." in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 500
        assert not EXTERNAL.search(r.text), (asset, EXTERNAL.search(r.text))
    assert not EXTERNAL.search(page.text), EXTERNAL.search(page.text)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(client, page):
    docs = client.get(page)
    assert docs.status_code == 200
    refs = re.findall(r"""(?:src|href)=["']([^"']+)""", docs.text)
    assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    assert "fonts.googleapis" not in docs.text and "cdn." not in docs.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/v1/health"} <= set(spec["paths"])


def test_large_decodes_go_through_the_worker_process(keyed):
    """A 16-bit PNG whose decode is estimated over serve.heavy.HEAVY_BYTES is decoded in the worker
    process: it scores like the same image decoded in-process, and a corrupt one comes back as the
    same 422 the in-process path gives."""
    from pneumoscan.serve import heavy

    side = 5000  # 25 M pixels x 3 bytes: over HEAVY_BYTES
    assert side * side * 3 > heavy.HEAVY_BYTES
    big = np.zeros((side, side), np.uint16)
    big[1000:4000, 1000:4000] = 40000
    blob = encode(big, "PNG")
    r = post(keyed, blob, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["probability"] <= 1
    broken = blob[: len(blob) // 2]  # header intact (so it is routed to the worker), data truncated
    assert_error(post(keyed, broken, headers={"X-API-Key": KEY}), 422, "not_an_image")


def test_openapi_matches_what_the_server_accepts_and_answers(keyed):
    spec = keyed.get("/openapi.json").json()
    bodies = spec["components"]["schemas"]
    assert bodies["Body_predict_v1_predict_post"]["properties"]["file"]["minLength"] == 1
    assert bodies["Body_predict_batch_v1_predict_batch_post"]["properties"]["files"]["minItems"] == 1
    for path in ("/v1/predict", "/v1/predict/batch"):
        assert {"400", "401", "408", "413", "422", "503"} <= set(spec["paths"][path]["post"]["responses"]), path
    model = spec["paths"]["/v1/model"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert model == {"$ref": "#/components/schemas/ModelCard"}
    card = keyed.get("/v1/model", headers={"X-API-Key": KEY}).json()
    assert set(bodies["ModelCard"]["required"]) <= set(card)


def test_docs_have_a_csp_with_their_inline_script_hashed(client):
    csp = client.get("/docs").headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'self'" in client.get("/redoc").headers["content-security-policy"]


def test_a_very_long_file_name_gets_an_honest_reason(client):
    body = assert_error(post(client, encode(xray(), "PNG"), name="a" * 4200 + ".png"), 400, "bad_request")
    assert "file name" in body["detail"] and "Invalid multipart data" not in body["detail"]


# --- privacy ---------------------------------------------------------------------------------

def test_logs_carry_no_file_names_or_patient_data(client, caplog):
    caplog.set_level(logging.DEBUG)
    good = encode(xray(), "PNG")
    post(client, good, name=f"{SECRET_NAME}.png")
    post(client, b"not an image", name=f"{SECRET_NAME}.txt")
    post(client, dicom_bytes(xray(size=64)), name=f"{SECRET_NAME}.dcm", params={"explain": "true"})
    client.post("/v1/predict/batch", files=[("files", (f"{SECRET_NAME}-{i}.png", b)) for i, b in
                                            enumerate([good, b"junk"])])
    text = caplog.text
    assert "POST /v1/predict 200" in text and "POST /v1/predict 422" in text  # the access log works
    assert "POST /v1/predict/batch 200" in text
    for secret in (SECRET_NAME, "DoeJanet", PATIENT, "MRN7731904"):
        assert secret not in text


# --- CLI -------------------------------------------------------------------------------------

def test_cli_serve(trained_model, monkeypatch, capsys):
    from pneumoscan.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port, settings: seen.update(
        app=app, host=host, port=port, settings=settings))
    assert cli.main(["serve", "--model", str(trained_model), "--port", "8123", "--max-upload-mb", "1",
                     "--header-timeout", "3", "--grace-seconds", "2"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["settings"].header_timeout_s == 3 and seen["settings"].grace_s == 2
    assert "http://127.0.0.1:8123/" in capsys.readouterr().err


def test_cli_serve_missing_model(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and "Traceback" not in err


ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO|WARNING|ERROR|DEBUG) [\w.]+: ")


@pytest.mark.slow  # seconds of a real server or model; make test runs it
def test_server_lines_are_dated_and_ctrl_c_drains_and_exits_0(trained_model, tmp_path):
    """`pneumoscan serve` as a user runs it: every log line starts with an ISO-8601 time, and SIGINT
    ends the process (exit 0) once the grace period is over even with an idle keep-alive connection
    and a half-sent upload, which gets 503 rather than a 500 and a traceback."""
    import http.client
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PNEUMOSCAN_API_KEY", None)
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscan.cli", "serve", "--model", str(trained_model),
                                 "--port", str(port), "--engine", "torch", "--grace-seconds", "1"],
                                env=env, stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_file.read_text()
                try:
                    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    idle.request("GET", "/v1/health")
                    assert idle.getresponse().read()  # kept alive, as a browser keeps it
                    break
                except OSError:
                    assert time.monotonic() < deadline, "server did not start"
                    time.sleep(0.2)
            busy = socket.create_connection(("127.0.0.1", port))
            busy.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")  # an upload that stalls halfway
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
            busy.settimeout(5)
            answer = busy.recv(4096)
            busy.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    assert code == 0, lines[-5:]
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert not any("Traceback" in line for line in lines), lines
    logged = [line for line in lines if not line.startswith("pneumoscan: open")]  # the one printed hint
    assert all(ISO_LINE.match(line) for line in logged), logged  # one dated line per record, to the end
    assert any("pneumoscan.serve.access: GET /v1/health 200" in line for line in logged)
    assert ISO_LINE.match(logged[-1]) and "Finished server process" in logged[-1]
