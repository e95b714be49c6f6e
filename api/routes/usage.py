"""Usage and statements of the caller's account (SPEC M2, M5, C1)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.deps import DB, State, allowed
from api.problems import responses
from api.schemas import (
    DailyUsageOut,
    DayClass,
    DayOut,
    StatementOut,
    StatementSummary,
    UsageOut,
)
from metering import usage_model
from metering.access import Principal
from metering.peak import month_bounds
from metering.pricing import format_money
from metering.statements import (
    Statement,
    current_month,
    get_statement,
    get_usage,
    list_statements,
    statement_document,
    usage_document,
)

router = APIRouter(prefix="/v1", tags=["usage"])

UsageReader = Annotated[Principal, Depends(allowed("usage:read"))]
StatementReader = Annotated[Principal, Depends(allowed("statements:read"))]
Month = Annotated[
    str | None,
    Query(pattern=r"^\d{4}-\d{2}$", description="YYYY-MM in the account's time zone; default: now"),
]


@router.get(
    "/usage",
    response_model=UsageOut,
    responses=responses(401, 403, 422),
    summary="Peak active devices per class of a month (preliminary while the month is open)",
)
def usage(caller: UsageReader, conn: DB, app: State, month: Month = None) -> UsageOut:
    month = month or current_month(caller.timezone, datetime.now(UTC))
    result = get_usage(
        conn, app.catalog, caller.account_ref, month, now=datetime.now(UTC), evidence=False
    )
    return UsageOut.model_validate(usage_document(result))


@router.get(
    "/usage/daily",
    response_model=DailyUsageOut,
    responses=responses(401, 403, 422),
    summary="Per day of a month: peak and end-of-day active devices per class (for charts)",
)
def usage_daily(caller: UsageReader, conn: DB, app: State, month: Month = None) -> DailyUsageOut:
    now = datetime.now(UTC)
    month = month or current_month(caller.timezone, now)
    result = get_usage(conn, app.catalog, caller.account_ref, month, now=now, evidence=False)
    start, end = month_bounds(month, caller.timezone)
    days = usage_model.daily(conn, caller.account_id, start, end, caller.timezone, until=now)
    peak = UsageOut.model_validate(usage_document(result)).classes
    return DailyUsageOut(
        account=caller.account_ref,
        month=month,
        status=result.status,
        timezone=caller.timezone,
        days=[
            DayOut(
                date=d.day,
                classes={c: DayClass(peak=p, end_of_day=e) for c, (p, e) in d.classes.items()},
            )
            for d in days
        ],
        peak=peak,
    )


def statement_out(s: Statement) -> StatementOut:
    return StatementOut.model_validate(statement_document(s))


@router.get(
    "/statements",
    response_model=list[StatementSummary],
    responses=responses(401, 403),
    summary="The account's final statements, newest first",
)
def statements(caller: StatementReader, conn: DB) -> list[StatementSummary]:
    return [
        StatementSummary(
            month=s.month,
            status="final",
            plan=s.plan,
            currency=s.currency,
            subtotal=format_money(s.subtotal, s.currency),
            tax=format_money(s.tax, s.currency),
            credits_applied=format_money(s.credits_applied, s.currency),
            amount_due=format_money(s.amount_due, s.currency),
            due_date=s.due_date,
            closed_at=s.closed_at,
        )
        for s in list_statements(conn, caller.account_ref)
    ]


@router.get(
    "/statements/{month}",
    response_model=StatementOut,
    responses=responses(401, 403, 422),
    summary="A month's statement: final once closed, else preliminary",
)
def statement(month: str, caller: StatementReader, conn: DB, app: State) -> StatementOut:
    return statement_out(
        get_statement(
            conn, app.catalog, caller.account_ref, month, now=datetime.now(UTC), evidence=False
        )
    )
