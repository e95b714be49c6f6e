"""Operator endpoints (``/v1/admin``), behind the operator token, not an account's API key."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse, Response
from psycopg.rows import class_row

from api.deps import DB, State, operator
from api.problems import responses
from api.schemas import (
    NO_NUL,
    AccountCreated,
    AccountIn,
    AccountOut,
    AccountStatusIn,
    AccountStatusOut,
    CloseIn,
    CloseOut,
)
from devmeter.db import connect
from metering.accounts import AccountStatus, set_account_status
from metering.export import export_month
from metering.registry import Account, create_account
from metering.statements import close_month

router = APIRouter(prefix="/v1/admin", tags=["operator"], dependencies=[Depends(operator)])


def _today_in(tz: str) -> date:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return datetime.now(ZoneInfo(tz)).date()
    except (ZoneInfoNotFoundError, ValueError):
        return datetime.now(UTC).date()  # create_account refuses the zone with a clear error


@router.post(
    "/accounts",
    status_code=201,
    response_model=AccountCreated,
    responses=responses(400, 401, 409, 415, 422),
    summary="Create an account with its owner; the owner's API key is in this response only",
)
def add_account(body: AccountIn, conn: DB, app: State) -> JSONResponse:
    tz = body.timezone or app.config.timezone
    with conn.transaction():
        created = create_account(
            conn,
            app.catalog,
            ref=body.ref,
            name=body.name,
            plan=body.plan,
            country=body.country,
            timezone=tz,
            # Today in the account's zone: its month there is the sign-up month (P5).
            signed_up_on=body.signed_up_on or _today_in(tz),
            owner_name=body.owner_name,
            owner_email=body.owner_email,
        )
    a = created.account
    out = AccountCreated(
        **AccountOut(**{f: getattr(a, f) for f in AccountOut.model_fields}).model_dump(),
        owner_member_id=created.owner_member_id,
        owner_key=created.api_key,
    )
    return JSONResponse(
        out.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"}
    )


@router.get(
    "/accounts", response_model=list[AccountOut], responses=responses(401), summary="All accounts"
)
def accounts(conn: DB) -> list[AccountOut]:
    with conn.cursor(row_factory=class_row(Account)) as cur:
        rows = cur.execute("SELECT * FROM accounts ORDER BY ref").fetchall()
    return [AccountOut(**{f: getattr(a, f) for f in AccountOut.model_fields}) for a in rows]


AccountRef = Annotated[str, Path(max_length=63, pattern=NO_NUL)]
StatusBody = Annotated[AccountStatusIn | None, Body()]


def _set_status(
    conn: DB, ref: str, status: AccountStatus, body: AccountStatusIn | None
) -> AccountStatusOut:
    with conn.transaction():
        result = set_account_status(
            conn,
            account_ref=ref,
            status=status,
            at=datetime.now(UTC),
            source="api",
            reason=body.reason if body else None,
        )
    last = result.last_change
    return AccountStatusOut(
        account=result.account.ref,
        status=status,
        changed=result.changed,
        changed_at=last.changed_at if last else None,
        reason=last.reason if last else None,
    )


@router.post(
    "/accounts/{ref}/suspend",
    response_model=AccountStatusOut,
    responses=responses(400, 401, 404, 415, 422),
    summary="Suspend an account (A3): registration and activation refused, heartbeats stored",
    description="Idempotent: suspending a suspended account answers 200 with `changed: false` "
    "and records nothing. Devices may still be deactivated; months still close.",
)
def suspend(ref: AccountRef, conn: DB, body: StatusBody = None) -> AccountStatusOut:
    return _set_status(conn, ref, "suspended", body)


@router.post(
    "/accounts/{ref}/resume",
    response_model=AccountStatusOut,
    responses=responses(400, 401, 404, 415, 422),
    summary="Resume a suspended account (idempotent, like suspend)",
)
def resume(ref: AccountRef, conn: DB, body: StatusBody = None) -> AccountStatusOut:
    return _set_status(conn, ref, "active", body)


@router.post(
    "/close",
    response_model=CloseOut,
    responses=responses(400, 401, 404, 409, 415, 422),
    summary="Close a month for all accounts or one (idempotent)",
)
def close(body: CloseIn, app: State) -> CloseOut:
    config = app.config
    url = app.database_url
    report = close_month(
        lambda: connect(url),
        app.catalog,
        body.month,
        now=datetime.now(UTC),
        account_ref=body.account,
        grace=timedelta(minutes=config.close_grace_minutes),
    )
    return CloseOut(
        month=report.month,
        closed=report.closed,
        already_closed=report.already_closed,
        not_due=report.not_due,
        not_applicable=report.not_applicable,
        failed=report.failed,
        seconds=report.seconds,
    )


@router.get(
    "/exports/{month}",
    responses={
        200: {
            "description": "The export file (same month, same bytes)",
            "content": {"text/csv": {}, "application/x-ndjson": {}},
        },
        **responses(401, 404, 422),
    },
    response_class=Response,
    summary="Download a closed month's export for billing",
    description="csv or jsonl: one row per statement line with the statement's totals; "
    "cloudevents: one CloudEvent 1.0 per line (JSON Lines, structured mode). A month closed "
    "before migration 0012 keeps the columns it was first exported with.",
)
def download_export(
    month: str,
    conn: DB,
    app: State,
    format: Annotated[Literal["csv", "jsonl", "cloudevents"], Query()] = "csv",
) -> Response:
    grace = timedelta(minutes=app.config.close_grace_minutes)
    result = export_month(conn, month, format, now=datetime.now(UTC), grace=grace)
    return Response(
        result.body,
        media_type=result.media_type,
        headers={
            "Content-Disposition": f'attachment; filename="{result.filename}"',
            "X-Devmeter-Export-Id": result.export_id,
            "X-Devmeter-Checksum": f"sha256={result.sha256}",
            "ETag": f'"{result.sha256}"',
        },
    )
