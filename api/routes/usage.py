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
    MeteredClassUsage,
    StatementOut,
    StatementSummary,
    UsageOut,
)
from metering.access import Principal
from metering.catalog import Catalog
from metering.daily import daily_usage, load_events
from metering.peak import month_bounds
from metering.pricing import class_amount, format_money
from metering.statements import (
    Statement,
    Usage,
    current_month,
    get_statement,
    get_usage,
    list_statements,
    statement_document,
)

router = APIRouter(prefix="/v1", tags=["usage"])

UsageReader = Annotated[Principal, Depends(allowed("usage:read"))]
StatementReader = Annotated[Principal, Depends(allowed("statements:read"))]
Month = Annotated[
    str | None,
    Query(pattern=r"^\d{4}-\d{2}$", description="YYYY-MM in the account's time zone; default: now"),
]


def priced_classes(
    catalog: Catalog, plan_name: str, usage: Usage
) -> tuple[str, dict[str, MeteredClassUsage]]:
    plan = catalog.plans.get(plan_name)
    currency = plan.currency if plan else ""
    out: dict[str, MeteredClassUsage] = {}
    for cls, peak in usage.classes.items():
        amount = None
        if plan is not None and cls in plan.classes:
            total = class_amount(cls, plan.classes[cls], peak.peak, plan.currency)
            amount = format_money(total, plan.currency)
        out[cls] = MeteredClassUsage(
            peak=peak.peak,
            peak_at=peak.peak_at,
            amount=amount,
            metric="distinct" if cls in usage.distinct else "peak",
        )
    return currency, out


@router.get(
    "/usage",
    response_model=UsageOut,
    responses=responses(401, 403, 422),
    summary="Peak active devices per class of a month (preliminary while the month is open)",
)
def usage(caller: UsageReader, conn: DB, app: State, month: Month = None) -> UsageOut:
    month = month or current_month(caller.timezone, datetime.now(UTC))
    result = get_usage(conn, app.catalog, caller.account_ref, month, now=datetime.now(UTC))
    currency, classes = priced_classes(app.catalog, caller.plan, result)
    return UsageOut(
        account=result.account,
        month=result.month,
        status=result.status,
        currency=currency,
        period_start=result.period_start,
        period_end=result.period_end,
        classes=classes,
    )


@router.get(
    "/usage/daily",
    response_model=DailyUsageOut,
    responses=responses(401, 403, 422),
    summary="Per day of a month: peak and end-of-day active devices per class (for charts)",
)
def usage_daily(caller: UsageReader, conn: DB, app: State, month: Month = None) -> DailyUsageOut:
    now = datetime.now(UTC)
    month = month or current_month(caller.timezone, now)
    result = get_usage(conn, app.catalog, caller.account_ref, month, now=now)
    start, end = month_bounds(month, caller.timezone)
    days = daily_usage(
        load_events(conn, caller.account_id, start, end), start, end, caller.timezone, until=now
    )
    _, peak = priced_classes(app.catalog, caller.plan, result)
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
            currency=s.currency,
            subtotal=format_money(s.subtotal, s.currency),
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
        get_statement(conn, app.catalog, caller.account_ref, month, now=datetime.now(UTC))
    )
