"""Heartbeats the ingest worker refused, about the caller's own devices (issue 9, part 6).

A refused message is still acknowledged to its publisher (the broker must not resend it), so
this is where an integrator learns that, and why. Every role may read it; developers are who
debug payloads. Only rows whose topic named one of the caller's registered devices are shown:
rows about unknown topics or devices have no account and are the operator's
(`devmeter rejections list --unattributed`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.deps import DB, allowed
from api.problems import responses
from api.schemas import NO_NUL, InputInstant, RejectionOut, RejectionsPage
from ingest.processor import Reason
from ingest.rejections import DEFAULT_LIMIT, MAX_LIMIT, RejectionFilter, list_rejections
from metering.access import Principal

router = APIRouter(prefix="/v1", tags=["rejections"])

Reader = Annotated[Principal, Depends(allowed("rejections:read"))]


@router.get(
    "/rejections",
    response_model=RejectionsPage,
    responses=responses(401, 403, 422),
    summary="Heartbeats refused for the caller's devices, newest first, one page at a time",
    description="Any role (developers debug payloads with it). A refused message was still "
    "acknowledged to its publisher; here is why it was not stored. Messages whose topic names "
    "no registered device of this account are not shown (they belong to no account).",
)
def rejections(
    caller: Reader,
    conn: DB,
    reason: Annotated[Reason | None, Query(description="only this reason")] = None,
    device_id: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=NO_NUL, description="only this device"),
    ] = None,
    since: Annotated[
        InputInstant | None,
        Query(description="received at or after this instant (RFC 3339, with an offset)"),
    ] = None,
    until: Annotated[
        InputInstant | None,
        Query(description="received before this instant (RFC 3339, with an offset)"),
    ] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> RejectionsPage:
    page = list_rejections(
        conn,
        caller.account_id,
        RejectionFilter(
            reason=reason.value if reason else None, device_id=device_id, since=since, until=until
        ),
        cursor=cursor,
        limit=limit,
    )
    return RejectionsPage(
        items=[RejectionOut.model_validate(asdict(r)) for r in page.items],
        next_cursor=page.next_cursor,
        summary=page.summary,
        summary_complete=page.summary_complete,
    )
