"""The HTTP service: a REST API and an offline web page for radiologists (``pneumoscan serve``).

The model is loaded once at startup; decoding, scoring and Grad-CAM run in the threadpool so the
event loop keeps answering. Every error is JSON ``{"error": code, "detail": sentence}``. Uploads
are bounded by bytes (the Content-Length header first, then counted while read) and by pixels (read
from the image header before decoding), and sniffed from their content. The page, its assets and
the API docs are served from the package, so nothing is fetched from the internet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, File, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pneumoscan import __version__
from pneumoscan.modeling import artifact
from pneumoscan.inference.engines import default_threads
from pneumoscan.inference.loading import check_kind
from pneumoscan.core.errors import UserError
from pneumoscan.io import imaging
from pneumoscan.io.imaging import FORMAT_NAMES
from pneumoscan.serve import heavy, uploads
from pneumoscan.serve.card import INTENDED_USE, model_card
from pneumoscan.serve.batcher import BatchSettings, Busy, TimedOut
from pneumoscan.serve.guard import Guard, GuardState
from pneumoscan.serve.middleware import AccessLog, DocsCSP, SecurityHeaders
from pneumoscan.serve.pilot import pilot_routes
from pneumoscan.serve.service import Service, png_bytes
from pneumoscan.serve.settings import (API_KEY_ENV, DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BATCH_FILES,
                                       DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES,
                                       RETRY_AFTER_S, MiB)
from pneumoscan.serve.worklist import study_routes
from pneumoscan.store import Store

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024  # per part: boundary and headers on top of the file itself
STATIC = Path(__file__).parent / "static"

# The page loads only its own files; images come back as data: URLs or local blob: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "request_too_large", 422: "invalid_request", 500: "internal_error",
               501: "not_implemented", 503: "busy", 504: "timeout"}

_FROM_ENV = object()

# Starlette's words for a multipart body it could not parse, and what they usually mean
MULTIPART_DETAILS = {
    "Invalid multipart data.": "the multipart body could not be parsed: a part header over 4 KiB (such as a very long "
                               "file name), more than 8 headers in a part, or a broken boundary",
    "There was an error parsing the body": "the multipart body could not be parsed",
}

# module level: with postponed annotations FastAPI resolves these names in the module's globals
ExplainQuery = Annotated[bool, Query(description="add a Grad-CAM overlay and the model's input image as PNGs (slower)")]
OneFile = Annotated[UploadFile, File(description=f"a {FORMAT_NAMES} image (not empty)",
                                     json_schema_extra={"minLength": 1})]
SeveralFiles = Annotated[list[UploadFile], File(description="1 or more images (the limit is in the description "
                                                            "above and in /v1/model), one `files` field each",
                                                json_schema_extra={"minItems": 1})]
KeyHeader = Annotated[str | None, Security(APIKeyHeader(
    name="X-API-Key", auto_error=False, description=f"the service's API key (${API_KEY_ENV} on the server)"))]


# --- response models (they are the OpenAPI schema at /docs) -------------------------------------

CAM_SCALE_HELP = ("colour scale of the overlay (explain=true): 'absolute' = the map times the probability, so "
                  "its brightest colour is the probability; 'relative' = scaled to this image's maximum")
CAM_FLAT_HELP = "true when no region raised the PNEUMONIA score: the overlay then carries no location"
CAM_OUTSIDE_HELP = ("share of the map's mass outside a fixed lung-field mask (a heuristic, see "
                    "pneumoscan.evaluation.explain); null when the map is flat")
CAM_BORDER_HELP = "share of the map's mass within 8% of the image border; null when the map is flat"

class ModelRef(BaseModel):
    name: str = Field(description="architecture")
    version: str = Field(description="pneumoscan version that trained the model")
    sha256: str = Field(description="of the model file")
    runtime: str = Field(description="what computed the score: onnxruntime or torch")


class Score(BaseModel):
    probability: float = Field(description="calibrated probability of PNEUMONIA; not meaningful when the label "
                                           "is NOT_ASSESSED")
    logit: float = Field(description="the calibrated logit (orders images whose probabilities round alike)")
    prediction: int | None = Field(None, description="1 if probability >= threshold, else 0; absent when NOT_ASSESSED")
    label: str = Field(description="NORMAL, PNEUMONIA, UNSURE when the probability lies in the model's UNSURE "
                                   "band (its conformal prediction set is not a single class; the band is in "
                                   "/v1/model), or NOT_ASSESSED when a flag says the model is not competent for "
                                   "the image (not_chest_xray, outside_training_population unless the server runs "
                                   "with --outside-population warn, low_quality); NOT_ASSESSED wins over UNSURE")
    decided: bool = Field(True, description="false for UNSURE and NOT_ASSESSED: the model gives no class "
                                            "(prediction is then the threshold's class, or absent)")
    threshold: float
    flags: list[str] = Field(description="input checks the image failed: not_chest_xray (probably not a frontal "
                                         "chest X-ray), outside_training_population (a frontal chest film unlike the "
                                         "training films, e.g. an adult's), low_quality (label NOT_ASSESSED), "
                                         "out_of_distribution (label kept); empty when none")
    flag_details: list[str] = Field(description="one sentence per flag, in the same order")
    ood_score: float | None = Field(None, description="out-of-distribution distance of the image's features "
                                                      "(the model card gives the cut-offs)")
    chest_logit: float | None = Field(None, description="the chest-film detector's logit (below the model card's "
                                                        "cut-off: not_chest_xray)")
    overlay_png_base64: str | None = Field(None, description="Grad-CAM overlay (explain=true)")
    image_png_base64: str | None = Field(None, description="the model's input image (explain=true)")
    cam_scale: str | None = Field(None, description=CAM_SCALE_HELP)
    cam_flat: bool | None = Field(None, description=CAM_FLAT_HELP)
    cam_outside_lungs: float | None = Field(None, ge=0, le=1, description=CAM_OUTSIDE_HELP)
    cam_on_border: float | None = Field(None, ge=0, le=1, description=CAM_BORDER_HELP)


class Prediction(Score):
    model: ModelRef


class BatchItem(BaseModel):
    filename: str | None = None
    probability: float | None = None
    logit: float | None = None
    prediction: int | None = None
    label: str | None = None
    decided: bool | None = None
    threshold: float | None = None
    flags: list[str] | None = None
    flag_details: list[str] | None = None
    ood_score: float | None = None
    chest_logit: float | None = None
    overlay_png_base64: str | None = None
    image_png_base64: str | None = None
    cam_scale: str | None = Field(None, description=CAM_SCALE_HELP)
    cam_flat: bool | None = Field(None, description=CAM_FLAT_HELP)
    cam_outside_lungs: float | None = Field(None, ge=0, le=1, description=CAM_OUTSIDE_HELP)
    cam_on_border: float | None = Field(None, ge=0, le=1, description=CAM_BORDER_HELP)
    error: str | None = Field(None, description="why this file was not scored")
    detail: str | None = None
    status: int | None = Field(None, description="the HTTP status this file alone would have got")


class BatchPrediction(BaseModel):
    results: list[BatchItem] = Field(description="one per file, in request order")
    model: ModelRef


class Health(BaseModel):
    status: str
    model_loaded: bool
    api_key_required: bool = Field(description="whether /v1 calls other than health need the X-API-Key header")
    result_store: bool = Field(False, description="whether /v1/studies lists a result store's studies (--db)")


class ServiceLimits(BaseModel):
    explanations: bool = Field(description="whether explain=true is available (needs the PyTorch model)")
    max_upload_bytes: int
    max_pixels: int
    max_batch_files: int


class ModelCard(BaseModel):
    """The model card (``serve.card``); fields not listed here are passed through as they are."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="architecture")
    sha256: str = Field(description="of the model file")
    runtime: str = Field(description="what computes the score: onnxruntime or torch")
    architecture: str
    image_size: int
    class_names: list[str]
    threshold: float
    threshold_rule: str | None = None
    temperature: float | None = None
    unsure: dict[str, Any] | None = Field(None, description="the UNSURE band [low, high) and how it was fitted")
    training_data: dict[str, Any]
    intended_use: str
    limitations: list[str]
    input_checks: dict[str, Any]
    service: ServiceLimits


class ErrorBody(BaseModel):
    error: str
    detail: str


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


async def _image(file: UploadFile, size: int, limits: uploads.Limits, slots: asyncio.Semaphore | None = None,
                 lane: heavy.HeavyLane | None = None) -> imaging.Picture | uploads.Rejected:
    """One upload as model input, or why not. Files are read one at a time and only their decoded
    (size x size) image is kept, so a full batch never sits in memory as raw bytes. ``slots``
    bounds how many decode at once: 32 decoding threads on two cores starve the scoring thread,
    which is the bottleneck, and throughput falls as clients are added. Large decodes go to the
    heavy lane (``serve.heavy``)."""
    try:
        if file.size is not None:
            uploads.check_size(file.size, limits)  # ruled out without reading it
        blob = await file.read()
        if lane is not None and await run_in_threadpool(heavy.estimate, blob, limits) > heavy.HEAVY_BYTES:
            return await lane.decode(blob, size, limits)
        async with slots or contextlib.nullcontext():
            return await run_in_threadpool(uploads.to_model_input, blob, size, limits)
    except uploads.Rejected as rejected:
        return rejected


async def _results(service: Service, pictures: list[imaging.Picture], explain: bool) -> list[dict[str, Any]]:
    """Scores, flags (and overlays) for decoded images: scores through the service's queue,
    overlays in the threadpool."""
    if not pictures:
        return []
    batch = np.stack([p.pixels for p in pictures])
    scores = await service.score(batch, [(p.width, p.height) for p in pictures])
    if explain:
        await run_in_threadpool(_add_overlays, service, batch, scores)
    return scores


def _add_overlays(service: Service, batch: np.ndarray, scores: list[dict[str, Any]]) -> None:
    explained = service.overlays(batch, [s["probability"] for s in scores])
    for score, image, ex in zip(scores, batch, explained, strict=True):
        score |= {"overlay_png_base64": _b64(ex.png), "image_png_base64": _b64(png_bytes(image))} | ex.fields()


@dataclass(frozen=True)
class ServerLimits:
    """What the service accepts, decided once in ``create_app`` and read by every stage."""

    uploads: uploads.Limits
    max_batch_files: int
    api_key: str | None

    @property
    def single_body(self) -> int:
        return self.uploads.max_bytes + MULTIPART_OVERHEAD

    @property
    def batch_body(self) -> int:
        return self.single_body * self.max_batch_files

    def body_limit(self, path: str) -> int:
        return {"/v1/predict": self.single_body, "/v1/predict/batch": self.batch_body}.get(path, MULTIPART_OVERHEAD)

    def body_detail(self, path: str) -> str:
        per_file = f"{self.uploads.max_bytes / MiB:.1f} MiB"
        if path == "/v1/predict/batch":
            return f"the request is over the limit of {self.max_batch_files} files of {per_file}"
        return f"the request is over the limit of {per_file} per file"


def create_app(model_path: str | Path | None = None, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_batch_files: int = DEFAULT_MAX_BATCH_FILES,
               api_key: str | None | object = _FROM_ENV, cors_origins: tuple[str, ...] | list[str] = (),
               engine: str = "auto", batching: BatchSettings | None = None,
               max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               db: str | None = None) -> FastAPI:
    """The service for the model at ``model_path`` (default: the bundled model).

    The model is loaded by the lifespan: in tests use ``with TestClient(app)``. Outside ``with``,
    routes that need the model fail (no service); after a ``with`` block ended, the service is
    closed and scoring answers 503 "shutting down" (the Guard is not involved: it keeps no state
    across requests but its in-flight count, which every request restores).

    ``api_key``: required in the X-API-Key header of every /v1 call except health; by default
    read from $PNEUMOSCAN_API_KEY, ``None`` (or empty) for no key. ``cors_origins``: browser
    origins allowed to call the API from other pages; none by default. ``engine``: the runtime
    for scores (see ``inference.loading.load_engine``); Grad-CAM always runs in PyTorch.
    ``batching``: the scoring queue's micro-batch size, wait, length and timeout
    (``serve.batcher.BatchSettings``; defaults in ``serve.settings``). ``max_in_flight``: requests
    handled at once before new ones get 503; ``body_timeout_s``: how long a request body may take
    to arrive before a 408 (see ``serve.guard``). ``db``: the result store's URL
    (``pneumoscan.store``), whose studies /v1/studies and the page's study worklist show.
    """
    path = artifact.resolve(model_path)  # fail here, not at startup, on a model that is not there
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    check_kind(engine)
    key = os.environ.get(API_KEY_ENV) if api_key is _FROM_ENV else api_key
    limits = ServerLimits(uploads.Limits(max_bytes=int(max_upload_bytes), max_pixels=int(max_pixels)),
                          int(max_batch_files), key or None)
    batching = batching or BatchSettings()
    store = Store.open(db) if db else None  # a bad URL or an unreachable database fails here, readably

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = await run_in_threadpool(Service.load, model_path, engine, batching)
        app.state.decode_slots = asyncio.Semaphore(default_threads())
        app.state.heavy_lane = heavy.HeavyLane()
        await run_in_threadpool(app.state.heavy_lane.warm)
        # the model and its libraries are loaded for good: keep the collector from re-scanning
        # them on every full collection, which under load showed as latency spikes
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            app.state.heavy_lane.close()
            await run_in_threadpool(app.state.service.close)
            if store is not None:
                store.close()

    app = FastAPIOffline(title="pneumoscan", version=__version__, lifespan=lifespan,
                         description=_description(limits) + "\n\n" + batching.describe())
    app.state.store = store
    add_error_handlers(app, limits)
    app.include_router(api_routes(limits))
    app.include_router(study_routes(_key_check(limits.api_key), _auth_errors(limits)))
    app.include_router(pilot_routes(_key_check(limits.api_key), path, bool(limits.api_key)))
    add_page(app)
    app.state.guard = GuardState(limits.api_key, limits.body_limit, limits.body_detail, max_in_flight=int(max_in_flight),
                                 body_timeout_s=float(body_timeout_s), retry_after_s=RETRY_AFTER_S)
    add_middleware(app, app.state.guard, cors_origins)
    return app


def _description(limits: ServerLimits) -> str:
    return (f"Pneumonia screening for chest X-rays (NORMAL vs PNEUMONIA). {INTENDED_USE}\n\n"
            f"Uploads: {FORMAT_NAMES}, at most {limits.uploads.max_bytes / MiB:.0f} MiB and "
            f"{limits.uploads.max_pixels:,} pixels per file, {limits.max_batch_files} files per batch "
            "(field `file` for /v1/predict, repeated field `files` for /v1/predict/batch)."
            + ("\n\nEvery /v1 endpoint except /v1/health needs the `X-API-Key` header." if limits.api_key else ""))


def add_error_handlers(app: FastAPI, limits: ServerLimits) -> None:
    """Every error is JSON {"error": code, "detail": sentence}."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = ERROR_CODES.get(exc.status_code, "error")
        detail = limits.body_detail(request.url.path) if exc.status_code == 413 else str(exc.detail)
        detail = MULTIPART_DETAILS.get(detail, detail)
        return _error(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(503, "busy", exc.detail, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        return _error(504, "timeout", f"{exc}; the server is overloaded, retry later")

    @app.exception_handler(uploads.Rejected)
    async def rejected(request: Request, exc: uploads.Rejected) -> JSONResponse:
        log.info("upload refused: %d %s", exc.status, exc.error)  # the code only: details may quote the file
        return _error(exc.status, exc.error, exc.detail, {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None)


def _key_check(api_key: str | None) -> list:
    """The dependency that guards /v1 routes when the service has a key; none otherwise."""
    if not api_key:
        return []

    async def require_key(key: KeyHeader) -> None:
        if not key or not secrets.compare_digest(key.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)")

    return [Security(require_key)]


def _auth_errors(limits: ServerLimits) -> dict:
    return {401: {"model": ErrorBody, "description": "missing or wrong API key"}} if limits.api_key else {}


def api_routes(limits: ServerLimits) -> APIRouter:
    """/v1: health, the model card, and scoring one file or a batch."""
    router = APIRouter(prefix="/v1")
    protected = _key_check(limits.api_key)
    errors = _auth_errors(limits)
    upload_errors = errors | {
        400: {"model": ErrorBody, "description": "malformed multipart body"},
        408: {"model": ErrorBody, "description": "the request body did not arrive within the server's deadline"},
        413: {"model": ErrorBody, "description": "file or request too large (bytes, pixels, decoding memory, files "
                                                 "per batch)"},
        422: {"model": ErrorBody, "description": f"not a {FORMAT_NAMES} image; empty upload; missing field"},
        503: {"model": ErrorBody, "description": "busy: the scoring queue, the requests in flight or the decoding "
                                                 "memory are full, or the server is shutting down; retry after "
                                                 "Retry-After seconds"},
        504: {"model": ErrorBody, "description": "timeout: not scored within the server's time limit"},
    }

    @router.get("/health", response_model=Health, tags=["service"])
    async def health(request: Request) -> dict:
        """Liveness; open even when an API key is set."""
        return {"status": "ok", "model_loaded": getattr(request.app.state, "service", None) is not None,
                "api_key_required": limits.api_key is not None,
                "result_store": getattr(request.app.state, "store", None) is not None}

    @router.get("/model", response_model=ModelCard, dependencies=protected, responses=errors, tags=["service"])
    async def model(request: Request) -> dict:
        """The model card: what the model is, its threshold and calibration, intended use, limitations."""
        service: Service = request.app.state.service
        return model_card(service.meta, sha256=service.engine.sha256, runtime=service.engine.name) | {"service": {
            "explanations": service.can_explain, "max_upload_bytes": limits.uploads.max_bytes,
            "max_pixels": limits.uploads.max_pixels, "max_batch_files": limits.max_batch_files}}

    @router.post("/predict", response_model=Prediction, response_model_exclude_none=True, dependencies=protected,
                 responses=upload_errors, max_body_size=limits.single_body, tags=["predict"])
    async def predict(request: Request, file: OneFile,
                      explain: ExplainQuery = False) -> dict:
        """Score one chest X-ray (multipart field `file`)."""
        service: Service = request.app.state.service
        _check_explain(service, explain)
        image = await _image(file, service.image_size, limits.uploads, request.app.state.decode_slots,
                             request.app.state.heavy_lane)
        if isinstance(image, uploads.Rejected):
            raise image
        (result,) = await _results(service, [image], explain)
        return result | {"model": service.model_ref}

    @router.post("/predict/batch", response_model=BatchPrediction, response_model_exclude_none=True,
                 dependencies=protected, responses=upload_errors, max_body_size=limits.batch_body, tags=["predict"])
    async def predict_batch(request: Request,
                            files: SeveralFiles,
                            explain: ExplainQuery = False) -> dict:
        """Score several X-rays (repeated multipart field `files`); a file that cannot be scored gets
        an error entry, the rest still count.

        Results keep the request order (sort by probability for a worklist)."""
        service: Service = request.app.state.service
        _check_explain(service, explain)
        if len(files) > limits.max_batch_files:
            raise uploads.Rejected(413, "too_many_files",
                                   f"{len(files)} files; the limit is {limits.max_batch_files} per batch")
        images = [await _image(f, service.image_size, limits.uploads, request.app.state.decode_slots,
                             request.app.state.heavy_lane) for f in files]
        scored = iter(await _results(service, [i for i in images if not isinstance(i, uploads.Rejected)], explain))
        items = [{"filename": f.filename} | ({"error": i.error, "detail": i.detail, "status": i.status}
                                              if isinstance(i, uploads.Rejected) else next(scored))
                 for f, i in zip(files, images, strict=True)]
        return {"results": items, "model": service.model_ref}

    return router


def _check_explain(service: Service, explain: bool) -> None:
    if explain and not service.can_explain:
        raise HTTPException(501, "explanations need the PyTorch model.pt; this server has none")


def add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                           "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def add_middleware(app: FastAPI, guard: GuardState, cors_origins) -> None:
    # outermost last: the access log sees every answer, including the Guard's early 401/413/503;
    # the Guard sits inside CORS so that its refusals still carry the CORS headers a page needs
    app.add_middleware(Guard, state=guard)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key"])
    app.add_middleware(DocsCSP)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(AccessLog)
