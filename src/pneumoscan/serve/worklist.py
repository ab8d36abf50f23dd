"""/v1/studies: the result store's studies as the worklist (``pneumoscan serve --db URL``).

The studies the DICOM node scored, most suspicious first, with the patient name and accession
number a radiologist needs to find them (the patient ID and the node's spool paths stay in the
store); these appear in the responses only, never in a log line
(the access log names the path, whose only variable part is the store's integer id). Behind the
API key when one is set. Store calls block, so they run in the threadpool.

In shadow mode (the store's ``shadow_mode`` setting, docs/pilot.md) a study nobody has read yet
shows no AI answer: its probability, label, "needs a human" and its films' results are left out,
and the list is ordered by arrival, so neither the JSON nor its order can anchor the reader.
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pneumoscan.store import SHADOW_MODE, STUDY_STATES, Store, StudyDetail, StudySummary

NO_STORE = "this server has no result store: start it with pneumoscan serve --db URL"
MAX_PAGE = 500
DATE_HELP = ("ISO date (whole day, UTC) or date-time; bounds when the study was first received: "
             "since <= received, received before the end of `until`")


class StudyList(BaseModel):
    studies: list[StudySummary] = Field(description="most suspicious first: highest assessed probability of "
                                                    "pneumonia, then studies with no assessed film")
    total: int = Field(description="studies matching the filters, all pages")
    limit: int
    offset: int


def parse_when(value: str | None, *, end: bool) -> datetime | None:
    """A query's date or date-time as an aware UTC datetime; a bare date covers its whole day
    (``since`` from its start, ``until`` to its end). Naive date-times are read as UTC."""
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day + timedelta(days=int(end)), time(), tzinfo=timezone.utc)
        when = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"not an ISO date or date-time: {value[:40]!r}") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def _store(request: Request) -> Store:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HTTPException(404, NO_STORE)
    return store


def shadow_on(store: Store) -> bool:
    return store.get_setting(SHADOW_MODE, "off") == "on"


def blind(summary: StudySummary) -> StudySummary:
    """An unread study's row without the AI's answer (shadow mode)."""
    if summary.read_label is not None:
        return summary
    return dataclasses.replace(summary, probability=None, label=None, needs_human=False)


def blind_detail(detail: StudyDetail) -> StudyDetail:
    if detail.summary.read_label is not None or any(r.current for r in detail.reads):
        return detail
    films = tuple(dataclasses.replace(f, results=()) for f in detail.films)
    return dataclasses.replace(detail, summary=blind(detail.summary), films=films)


def study_routes(protected: list, errors: dict) -> APIRouter:
    """GET /v1/studies (filters and paging) and GET /v1/studies/{id}."""
    router = APIRouter(prefix="/v1", tags=["worklist"], dependencies=protected)
    not_found = errors | {404: {"description": "no such study, or no result store on this server"}}

    @router.get("/studies", response_model=StudyList, responses=not_found | {422: {"description": "bad filter"}},
                response_model_exclude={"studies": {"__all__": {"patient_id"}}})
    async def studies(request: Request,
                      state: Annotated[str | None, Query(description=f"one of {', '.join(STUDY_STATES)}")] = None,
                      since: Annotated[str | None, Query(description=DATE_HELP)] = None,
                      until: Annotated[str | None, Query(description=DATE_HELP)] = None,
                      needs_human: Annotated[bool | None, Query(description="only flagged (or unflagged) studies")] = None,
                      limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
                      offset: Annotated[int, Query(ge=0)] = 0) -> StudyList:
        """The store's studies, most suspicious first, with patient name and accession number."""
        store = _store(request)
        if state is not None and state not in STUDY_STATES:
            raise HTTPException(422, f"state must be one of {', '.join(STUDY_STATES)}")
        filters = dict(state=state, since=parse_when(since, end=False), until=parse_when(until, end=True),
                       needs_human=needs_human)
        shadow = await run_in_threadpool(shadow_on, store)
        if shadow and needs_human is not None:
            raise HTTPException(422, "needs_human tells the AI's answer: not available in shadow mode")
        rows = await run_in_threadpool(lambda: store.list_studies(limit=limit, offset=offset, by_arrival=shadow,
                                                                  **filters))
        total = await run_in_threadpool(lambda: store.count_studies(**filters))
        return StudyList(studies=[blind(r) for r in rows] if shadow else rows, total=total, limit=limit,
                         offset=offset)

    @router.get("/studies/{study_id}", response_model=StudyDetail, responses=not_found,
                response_model_exclude={"summary": {"patient_id"}, "films": {"__all__": {"spool_path", "claimed_by"}}})
    async def study(request: Request, study_id: int) -> StudyDetail:
        """One study: its films (with why a film was not scored), every model's result with its flags
        and deliveries, and the radiologists' reads (corrections included, oldest first)."""
        store = _store(request)
        detail = await run_in_threadpool(store.study, study_id)
        if detail is None:
            raise HTTPException(404, f"no study with id {study_id}")
        return blind_detail(detail) if await run_in_threadpool(shadow_on, store) else detail

    return router
