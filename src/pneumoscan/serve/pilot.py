"""The silent pilot's HTTP face: radiologists' reads, the drift monitor and the shadow-mode switch.

``POST /v1/studies/{id}/read`` records a read (NORMAL / PNEUMONIA / NOT_ASSESSABLE, a comment, who:
the name the reader typed, else "api-key" when the service has a key); a second read of the same
study (and film) corrects the first and the history is kept (``GET /v1/studies/{id}/reads``).
``GET /v1/monitor`` runs the drift checks of ``pneumoscan monitor``; ``GET``/``PUT /v1/shadow``
read and switch shadow mode (recorded in the store's settings log). All need the result store
(``serve --db``, ``app.state.store``) and, when the service has one, the API key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pneumoscan.core.errors import UserError
from pneumoscan.store.store import SHADOW_MODE


class ReadIn(BaseModel):
    label: Literal["NORMAL", "PNEUMONIA", "NOT_ASSESSABLE"]
    comment: str | None = Field(default=None, max_length=2000)
    reader: str | None = Field(default=None, max_length=120, description="the reader's name or code")
    film_id: int | None = None


class ShadowIn(BaseModel):
    on: bool
    by: str | None = Field(default=None, max_length=120)


def _store(request: Request):
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HTTPException(404, "no result store attached: start the service with serve --db URL")
    return store


def _read_dict(r) -> dict:
    return {"id": r.id, "study_id": r.study_id, "film_id": r.film_id, "label": r.label, "comment": r.comment,
            "reader": r.reader, "created_at": r.created_at.isoformat(), "current": r.current}


def pilot_routes(protected: list, model_path: str | Path | None, keyed: bool) -> APIRouter:
    """The router; ``protected`` is the API-key dependency (empty without a key)."""
    router = APIRouter(prefix="/v1", dependencies=protected, tags=["pilot"])

    @router.post("/studies/{study_id}/read", status_code=201)
    async def add_read(study_id: int, body: ReadIn, request: Request) -> dict:
        store = _store(request)
        reader = (body.reader or "").strip() or ("api-key" if keyed else "")
        if not reader:
            raise HTTPException(422, "say who read it: give 'reader' (a name or code)")
        if await run_in_threadpool(store.study, study_id) is None:
            raise HTTPException(404, f"no study {study_id}")
        try:
            read = await run_in_threadpool(lambda: store.add_read(study_id, body.label, reader, comment=body.comment,
                                                                  film_id=body.film_id))
        except (KeyError, ValueError):
            raise HTTPException(422, "that film is not part of this study") from None
        return _read_dict(read)

    @router.get("/studies/{study_id}/reads")
    async def reads(study_id: int, request: Request) -> dict:
        store = _store(request)
        if await run_in_threadpool(store.study, study_id) is None:
            raise HTTPException(404, f"no study {study_id}")
        return {"reads": [_read_dict(r) for r in await run_in_threadpool(store.read_history, study_id)]}

    @router.get("/monitor")
    async def monitor(request: Request, window: Annotated[int, Query(ge=10, le=100_000)] = 200) -> dict:
        from pneumoscan.commands import pilot

        store = _store(request)
        try:
            return await run_in_threadpool(pilot.monitor, store, model_path, window)
        except UserError as exc:  # no results of this model yet, or a model without a validation reference
            raise HTTPException(409, str(exc)) from None

    @router.get("/shadow")
    async def shadow(request: Request) -> dict:
        store = _store(request)
        return {"shadow_mode": (await run_in_threadpool(store.get_setting, SHADOW_MODE, "off")) == "on"}

    @router.put("/shadow")
    async def set_shadow(body: ShadowIn, request: Request) -> dict:
        store = _store(request)
        who = (body.by or "").strip() or ("api-key" if keyed else "page")
        await run_in_threadpool(store.set_setting, SHADOW_MODE, "on" if body.on else "off", who)
        return {"shadow_mode": body.on}

    return router
