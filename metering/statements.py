"""Usage and statements of a month (SPEC M5, C1): preliminary on demand, final once closed.

A closed month is read back exactly as it was stored; an open one is computed from the
state events each time it is asked for and is never written. Closing is the only writer:
it inserts with ON CONFLICT on (account, month), so a second closer waits for the first and
then does nothing, and it commits each account on its own so that one failing account cannot
stop the others.
"""

from __future__ import annotations

import calendar
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import class_row, dict_row

from devmeter.errors import ConflictError, InvalidError
from metering.catalog import Catalog
from metering.peak import ClassPeak, month_bounds, parse_month
from metering.peak_frame import peaks, peaks_many
from metering.pricing import Line, price_month
from metering.registry import Account, get_account

log = logging.getLogger("devmeter.close")

Conn = psycopg.Connection[Any]
Status = Literal["preliminary", "final"]

#: Late heartbeats for the month that just ended get this long to arrive before it closes (C1).
DEFAULT_GRACE = timedelta(hours=2)


@dataclass(frozen=True, slots=True)
class Usage:
    account: str
    month: str
    status: Status
    period_start: datetime
    period_end: datetime
    classes: dict[str, ClassPeak]


@dataclass(frozen=True, slots=True)
class Statement:
    account: str
    month: str
    status: Status
    plan: str
    currency: str
    period_start: datetime
    period_end: datetime
    lines: tuple[Line, ...]
    subtotal: Decimal
    tax_rate: Decimal
    tax: Decimal
    credits_applied: Decimal
    amount_due: Decimal
    due_date: date
    closed_at: datetime | None
    peaks: dict[str, ClassPeak]


def month_start(month: str) -> date:
    year, number = parse_month(month)
    return date(year, number, 1)


def month_name(first: date) -> str:
    return f"{first.year:04d}-{first.month:02d}"


def due_date(month: str) -> date:
    """End of the following month: "month-end closing, payment the following month" (C1)."""
    year, number = parse_month(month)
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return date(year, number, calendar.monthrange(year, number)[1])


def current_month(tz: str, now: datetime) -> str:
    from zoneinfo import ZoneInfo

    local = now.astimezone(ZoneInfo(tz))
    return f"{local.year:04d}-{local.month:02d}"


def closable_at(account: Account, month: str, grace: timedelta = DEFAULT_GRACE) -> datetime:
    """The first instant the month may be closed: its end in the account's zone, plus grace."""
    return month_bounds(month, account.timezone)[1] + grace


# --- reading -----------------------------------------------------------------------------


def get_usage(conn: Conn, account_ref: str, month: str, *, now: datetime) -> Usage:
    account = get_account(conn, account_ref)
    start, end = month_bounds(month, account.timezone)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        return Usage(account.ref, month, "final", start, end, _stored_peaks(conn, stored["id"]))
    _refuse_future(account, month, start, now)
    return Usage(account.ref, month, "preliminary", start, end, peaks(conn, account.id, start, end))


def get_statement(
    conn: Conn, catalog: Catalog, account_ref: str, month: str, *, now: datetime
) -> Statement:
    account = get_account(conn, account_ref)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        return _stored_statement(conn, account, month, stored)
    start, end = month_bounds(month, account.timezone)
    _refuse_future(account, month, start, now)
    classes = peaks(conn, account.id, start, end)
    return _price(catalog, account, month, start, end, classes, status="preliminary")


@dataclass(frozen=True, slots=True)
class StatementSummary:
    """A final statement's totals, for lists: one query for all months, no lines or peaks."""

    month: str
    plan: str
    currency: str
    subtotal: Decimal
    tax: Decimal
    credits_applied: Decimal
    amount_due: Decimal
    due_date: date
    closed_at: datetime


def list_statements(conn: Conn, account_ref: str) -> list[StatementSummary]:
    """The account's final statements, newest first."""
    account = get_account(conn, account_ref)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT month, plan, currency, subtotal, tax, credits_applied, amount_due, due_date,"
            " closed_at FROM statements WHERE account_id = %s ORDER BY month DESC",
            (account.id,),
        ).fetchall()
    return [
        StatementSummary(
            **{
                **row,
                "month": month_name(row["month"]),
                "closed_at": row["closed_at"].astimezone(UTC),
            }
        )
        for row in rows
    ]


def _refuse_future(account: Account, month: str, start: datetime, now: datetime) -> None:
    if start > now:
        raise InvalidError(
            f"month {month} has not started yet in {account.timezone} "
            f"(current month: {current_month(account.timezone, now)})",
            field="month",
        )


def _price(
    catalog: Catalog,
    account: Account,
    month: str,
    start: datetime,
    end: datetime,
    peaks: dict[str, ClassPeak],
    *,
    status: Status,
) -> Statement:
    plan = catalog.plans.get(account.plan)
    if plan is None:
        raise InvalidError(
            f"account {account.ref!r} is on plan {account.plan!r}, which the catalog lacks",
            field="plan",
        )
    first = month_start(month)
    # P5: the sign-up month is free when the plan says so; billing starts the month after.
    free = plan.free_signup_month and (
        account.signed_up_on.year,
        account.signed_up_on.month,
    ) == (first.year, first.month)
    priced = price_month(plan, {c: p.peak for c, p in peaks.items()}, signup_month_free=free)
    zero = Decimal(0)
    return Statement(
        account=account.ref,
        month=month,
        status=status,
        plan=account.plan,
        currency=priced.currency,
        period_start=start,
        period_end=end,
        lines=priced.lines,
        subtotal=priced.subtotal,
        # Tax and credit points are filled in by the billing-policy work (P3, P4).
        tax_rate=zero,
        tax=zero,
        credits_applied=zero,
        amount_due=priced.subtotal,
        due_date=due_date(month),
        closed_at=None,
        peaks=peaks,
    )


def _stored_statement_row(conn: Conn, account_id: int, month: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM statements WHERE account_id = %s AND month = %s",
            (account_id, month_start(month)),
        ).fetchone()


def _stored_peaks(conn: Conn, statement_id: int) -> dict[str, ClassPeak]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT device_class, peak, peak_at, device_ids FROM statement_peaks"
            " WHERE statement_id = %s ORDER BY device_class",
            (statement_id,),
        ).fetchall()
    return {
        r["device_class"]: ClassPeak(
            r["device_class"], r["peak"], r["peak_at"].astimezone(UTC), tuple(r["device_ids"])
        )
        for r in rows
    }


def _stored_statement(conn: Conn, account: Account, month: str, row: dict[str, Any]) -> Statement:
    with conn.cursor(row_factory=dict_row) as cur:
        lines = cur.execute(
            "SELECT kind, device_class, description, quantity, unit_price, amount, tier,"
            " tier_from, tier_to FROM statement_lines WHERE statement_id = %s ORDER BY line_no",
            (row["id"],),
        ).fetchall()
    return Statement(
        account=account.ref,
        month=month,
        status="final",
        plan=row["plan"],
        currency=row["currency"],
        period_start=row["period_start"].astimezone(UTC),
        period_end=row["period_end"].astimezone(UTC),
        lines=tuple(Line(**line) for line in lines),
        subtotal=row["subtotal"],
        tax_rate=row["tax_rate"],
        tax=row["tax"],
        credits_applied=row["credits_applied"],
        amount_due=row["amount_due"],
        due_date=row["due_date"],
        closed_at=row["closed_at"].astimezone(UTC),
        peaks=_stored_peaks(conn, row["id"]),
    )


# --- closing -----------------------------------------------------------------------------


@dataclass(slots=True)
class CloseReport:
    month: str
    closed: list[str] = field(default_factory=list)
    already_closed: list[str] = field(default_factory=list)
    #: Accounts whose month has not ended (plus grace) yet in their time zone.
    not_due: list[str] = field(default_factory=list)
    #: Accounts that signed up after the month: they have nothing to bill for it.
    not_applicable: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def close_month(
    connect: Callable[[], Conn],
    catalog: Catalog,
    month: str,
    *,
    now: datetime,
    account_ref: str | None = None,
    grace: timedelta = DEFAULT_GRACE,
    on_closed: Callable[[Conn, int], None] | None = None,
) -> CloseReport:
    """Close ``month`` for one account or all; idempotent and safe to run concurrently.

    ``connect`` opens a fresh connection: each account commits on its own. Peaks are
    computed for all due accounts of a time zone in one query; a second closer that loses
    the race for an account finds its statement under the lock and does nothing.
    ``on_closed(conn, statement_id)`` runs inside the account's transaction (the webhook
    outbox uses it, so a delivery exists exactly when the statement does).
    """
    import time

    started = time.monotonic()
    first = month_start(month)
    report = CloseReport(month)
    with connect() as conn:
        accounts = _accounts(conn, account_ref)
        closed = {
            row["account_id"]
            for row in conn.execute("SELECT account_id FROM statements WHERE month = %s", (first,))
        }
    due: dict[str, list[Account]] = {}
    for account in accounts:
        if account.id in closed:
            report.already_closed.append(account.ref)
        elif (account.signed_up_on.year, account.signed_up_on.month) > (first.year, first.month):
            report.not_applicable.append(account.ref)
        elif now < closable_at(account, month, grace):
            report.not_due.append(account.ref)
        else:
            due.setdefault(account.timezone, []).append(account)
    if account_ref is not None and report.not_due:
        account = accounts[0]
        raise ConflictError(
            f"month {month} of account {account.ref!r} cannot be closed before "
            f"{closable_at(account, month, grace).isoformat()} (its end in {account.timezone} "
            f"plus {grace} grace for late heartbeats)",
            field="month",
        )
    for tz, group in sorted(due.items()):
        start, end = month_bounds(month, tz)
        try:
            with connect() as conn:
                peaks = peaks_many(conn, [a.id for a in group], start, end)
        except psycopg.Error as exc:
            for account in group:
                _record_failure(connect, report, account, month, exc)
            continue
        _close_group(connect, catalog, report, group, month, start, end, peaks, on_closed)
    report.seconds = time.monotonic() - started
    return report


def _close_group(
    connect: Callable[[], Conn],
    catalog: Catalog,
    report: CloseReport,
    group: list[Account],
    month: str,
    start: datetime,
    end: datetime,
    peaks: dict[int, dict[str, ClassPeak]],
    on_closed: Callable[[Conn, int], None] | None,
) -> None:
    """One transaction per account on one connection: a connection per account cost more
    than the inserts (1,000 accounts: ~16 s of connects). A failed account rolls back alone;
    a broken connection is replaced."""
    first = month_start(month)
    conn: Conn | None = None
    try:
        for account in group:
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = connect()
                statement = _price(
                    catalog, account, month, start, end, peaks[account.id], status="final"
                )
                if _insert_statement(conn, account, first, statement, on_closed):
                    report.closed.append(account.ref)
                else:
                    report.already_closed.append(account.ref)
            except Exception as exc:  # one account's failure must not stop the others
                _record_failure(connect, report, account, month, exc)
    finally:
        if conn is not None:
            conn.close()


def _accounts(conn: Conn, account_ref: str | None) -> list[Account]:
    if account_ref is not None:
        return [get_account(conn, account_ref)]
    with conn.cursor(row_factory=class_row(Account)) as cur:
        return cur.execute("SELECT * FROM accounts ORDER BY ref").fetchall()


def _insert_statement(
    conn: Conn,
    account: Account,
    first: date,
    statement: Statement,
    on_closed: Callable[[Conn, int], None] | None,
) -> bool:
    with conn.transaction():
        lines = statement.lines
        peaks = list(statement.peaks.values())
        row = conn.execute(
            _INSERT_STATEMENT,
            {
                "account_id": account.id,
                "month": first,
                "timezone": account.timezone,
                "period_start": statement.period_start,
                "period_end": statement.period_end,
                "plan": statement.plan,
                "currency": statement.currency,
                "subtotal": statement.subtotal,
                "tax_rate": statement.tax_rate,
                "tax": statement.tax,
                "credits_applied": statement.credits_applied,
                "amount_due": statement.amount_due,
                "due_date": statement.due_date,
                "closed_by": _CLOSER,
                "line_no": list(range(1, len(lines) + 1)),
                "kind": [x.kind for x in lines],
                "device_class": [x.device_class for x in lines],
                "description": [x.description for x in lines],
                "quantity": [x.quantity for x in lines],
                "unit_price": [x.unit_price for x in lines],
                "amount": [x.amount for x in lines],
                "tier": [x.tier for x in lines],
                "tier_from": [x.tier_from for x in lines],
                "tier_to": [x.tier_to for x in lines],
                "peak_class": [p.device_class for p in peaks],
                "peak": [p.peak for p in peaks],
                "peak_at": [p.peak_at for p in peaks],
                # text[][] cannot be ragged: each device list travels as one string.
                "device_ids": ["\x1f".join(p.device_ids) for p in peaks],
            },
        ).fetchone()
        if row is None:
            # Another closer got there first (the unique key waited for it): nothing to do.
            return False
        statement_id = int(row["id"])
        if on_closed is not None:
            on_closed(conn, statement_id)
    return True


_CLOSER = f"{socket.gethostname()}:{os.getpid()}"

# One statement writes the statement, its lines and its peaks (and clears a recorded failure).
_INSERT_STATEMENT: Final = """
WITH s AS (
    INSERT INTO statements (account_id, month, timezone, period_start, period_end, plan,
        currency, subtotal, tax_rate, tax, credits_applied, amount_due, due_date, closed_by)
    VALUES (%(account_id)s, %(month)s, %(timezone)s, %(period_start)s, %(period_end)s,
        %(plan)s, %(currency)s, %(subtotal)s, %(tax_rate)s, %(tax)s, %(credits_applied)s,
        %(amount_due)s, %(due_date)s, %(closed_by)s)
    -- Idempotent close: a second closer's insert waits for the first to commit, then does
    -- nothing, and the lines and peaks below have no statement to attach to.
    ON CONFLICT (account_id, month) DO NOTHING
    RETURNING id
), lines AS (
    INSERT INTO statement_lines (statement_id, line_no, kind, device_class, description,
        quantity, unit_price, amount, tier, tier_from, tier_to)
    SELECT s.id, l.* FROM s, unnest(
        %(line_no)s::int[], %(kind)s::text[], %(device_class)s::text[], %(description)s::text[],
        %(quantity)s::int[], %(unit_price)s::numeric[], %(amount)s::numeric[], %(tier)s::int[],
        %(tier_from)s::int[], %(tier_to)s::int[]) AS l
), peaks AS (
    INSERT INTO statement_peaks (statement_id, device_class, peak, peak_at, device_ids)
    SELECT s.id, p.device_class, p.peak, p.peak_at,
           CASE WHEN p.ids = '' THEN '{}'::text[] ELSE string_to_array(p.ids, E'\x1f') END
    FROM s, unnest(%(peak_class)s::text[], %(peak)s::int[], %(peak_at)s::timestamptz[],
        %(device_ids)s::text[]) AS p(device_class, peak, peak_at, ids)
), cleared AS (
    DELETE FROM close_failures WHERE account_id = %(account_id)s AND month = %(month)s
)
SELECT id FROM s
"""


def _record_failure(
    connect: Callable[[], Conn],
    report: CloseReport,
    account: Account,
    month: str,
    exc: BaseException,
) -> None:
    message = f"{type(exc).__name__}: {exc}".strip()[:2000]
    report.failed[account.ref] = message
    log.error("closing %s of account %r failed (will retry): %s", month, account.ref, message)
    try:
        with connect() as conn:
            conn.execute(
                """
                INSERT INTO close_failures (account_id, month, last_error)
                VALUES (%s, %s, %s)
                ON CONFLICT (account_id, month) DO UPDATE
                SET attempts = close_failures.attempts + 1, last_error = EXCLUDED.last_error,
                    last_attempt = now()
                """,
                (account.id, month_start(month), message),
            )
    except psycopg.Error:
        # The database itself is what failed; the log line above is the record.
        log.exception("could not record the failure of account %r", account.ref)


# --- the scheduler's view ----------------------------------------------------------------


def due_months(
    conn: Conn, *, now: datetime, grace: timedelta = DEFAULT_GRACE
) -> list[tuple[str, list[str]]]:
    """Every (month, accounts) that has ended plus grace and is not closed yet.

    From each account's sign-up month on, so that a scheduler that was down for a while (or
    a history import) catches up month by month, oldest first.
    """
    with conn.cursor(row_factory=class_row(Account)) as cur:
        accounts = cur.execute("SELECT * FROM accounts ORDER BY ref").fetchall()
    closed = {
        (row["account_id"], row["month"])
        for row in conn.execute("SELECT account_id, month FROM statements")
    }
    todo: dict[str, list[str]] = {}
    for account in accounts:
        for month in _months_from(account.signed_up_on, current_month(account.timezone, now)):
            if (account.id, month_start(month)) in closed:
                continue
            if now < closable_at(account, month, grace):
                break
            todo.setdefault(month, []).append(account.ref)
    return sorted(todo.items())


def _months_from(first: date, last: str) -> Iterable[str]:
    year, number = first.year, first.month
    while (month := f"{year:04d}-{number:02d}") <= last:
        yield month
        year, number = (year + 1, 1) if number == 12 else (year, number + 1)
