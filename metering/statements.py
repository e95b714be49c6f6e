"""Usage and statements of a month (SPEC M5, C1): preliminary on demand, final once closed.

A closed month is read back exactly as it was stored; an open one is computed from the
state events each time it is asked for and is never written. Closing is the only writer:
it inserts with ON CONFLICT on (account, month), so a second closer waits for the first and
then does nothing. Accounts commit in batches; a failed batch is retried one account per
transaction, so that one failing account cannot stop the others.
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
from metering.catalog import Catalog, distinct_classes
from metering.peak import ClassPeak, month_bounds, parse_month
from metering.peak_frame import peaks, peaks_many
from metering.pricing import Line, format_money, price_month
from metering.registry import Account, get_account
from metering.tax import period_tax

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
    #: The classes counted as distinct devices (M6); the others are peaks (M2).
    distinct: frozenset[str] = frozenset()


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


def get_usage(
    conn: Conn, catalog: Catalog, account_ref: str, month: str, *, now: datetime
) -> Usage:
    account = get_account(conn, account_ref)
    start, end = month_bounds(month, account.timezone)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        classes = _stored_peaks(conn, stored["id"])
        return Usage(
            account.ref, month, "final", start, end, classes, _distinct(catalog, stored["plan"])
        )
    _refuse_future(account, month, start, now)
    distinct = _distinct(catalog, account.plan)
    classes = peaks(conn, account.id, start, end, distinct=distinct)
    return Usage(account.ref, month, "preliminary", start, end, classes, distinct)


def get_statement(
    conn: Conn, catalog: Catalog, account_ref: str, month: str, *, now: datetime
) -> Statement:
    account = get_account(conn, account_ref)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        return _stored_statement(conn, account, month, stored)
    start, end = month_bounds(month, account.timezone)
    _refuse_future(account, month, start, now)
    classes = peaks(conn, account.id, start, end, distinct=_distinct(catalog, account.plan))
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


def statement_document(statement: Statement, *, evidence: bool = False) -> dict[str, Any]:
    """The statement as the CLI prints it and the API returns it: amounts as exact decimal
    strings in the currency's minor unit; with ``evidence``, the devices behind each peak."""
    currency = statement.currency
    document: dict[str, Any] = {
        "account": statement.account,
        "month": statement.month,
        "status": statement.status,
        "plan": statement.plan,
        "currency": currency,
        "period_start": statement.period_start,
        "period_end": statement.period_end,
        "usage": {c: {"peak": p.peak, "peak_at": p.peak_at} for c, p in statement.peaks.items()},
        "lines": [
            {
                "kind": line.kind,
                "class": line.device_class,
                "description": line.description,
                "quantity": line.quantity,
                "unit_price": format_money(line.unit_price, currency),
                "amount": format_money(line.amount, currency),
                "tier": line.tier,
            }
            for line in statement.lines
        ],
        "subtotal": format_money(statement.subtotal, currency),
        "tax": format_money(statement.tax, currency),
        "credits_applied": format_money(statement.credits_applied, currency),
        "amount_due": format_money(statement.amount_due, currency),
        "due_date": statement.due_date,
        "closed_at": statement.closed_at,
    }
    if evidence:
        document["evidence"] = {c: list(p.device_ids) for c, p in statement.peaks.items()}
    return document


def _distinct(catalog: Catalog, plan: str) -> frozenset[str]:
    """The classes the plan counts as distinct devices (M6). A plan the catalog lacks counts
    none; pricing then refuses it by name."""
    return distinct_classes(catalog.plans.get(plan))


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
    # P3: the country's rate in force on the month's first day, once on the subtotal.
    tax = period_tax(catalog.tax_table(account.country), first, priced.subtotal, priced.currency)
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
        tax_rate=tax.rate,
        tax=tax.amount,
        # Credit points (P4) are not built yet: the whole amount is due.
        credits_applied=zero,
        amount_due=priced.subtotal + tax.amount,
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

    ``connect`` opens a fresh connection (one per time zone, and after a failure). Peaks are
    computed for all due accounts of a time zone at once; a second closer that loses the
    race for an account finds its statement under the lock and does nothing.
    ``on_closed(conn, statement_id)`` runs inside the transaction that inserts it (the webhook
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
    # Accounts share one peaks query per time zone and set of classes counted as distinct.
    due: dict[tuple[str, frozenset[str]], list[Account]] = {}
    for account in accounts:
        if account.id in closed:
            report.already_closed.append(account.ref)
        elif (account.signed_up_on.year, account.signed_up_on.month) > (first.year, first.month):
            report.not_applicable.append(account.ref)
        elif now < closable_at(account, month, grace):
            report.not_due.append(account.ref)
        else:
            due.setdefault((account.timezone, _distinct(catalog, account.plan)), []).append(account)
    if account_ref is not None and report.not_due:
        account = accounts[0]
        raise ConflictError(
            f"month {month} of account {account.ref!r} cannot be closed before "
            f"{closable_at(account, month, grace).isoformat()} (its end in {account.timezone} "
            f"plus {grace} grace for late heartbeats)",
            field="month",
        )
    for (tz, distinct), group in sorted(due.items(), key=lambda x: (x[0][0], sorted(x[0][1]))):
        start, end = month_bounds(month, tz)
        try:
            with connect() as conn:
                peaks = peaks_many(conn, [a.id for a in group], start, end, distinct=distinct)
        except Exception as exc:  # this zone's accounts fail (recorded, retried); others go on
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
    """The group's statements, a batch of accounts per transaction on one connection.

    A transaction per account cost a commit (a WAL flush) each, more than the inserts. Should
    a batch fail, its accounts are tried again one per transaction, so a failing account
    rolls back alone and the others close; a broken connection is replaced.
    """
    first = month_start(month)
    conn: Conn | None = None
    try:
        for offset in range(0, len(group), _BATCH):
            priced: list[tuple[Account, Statement]] = []
            for account in group[offset : offset + _BATCH]:
                try:
                    statement = _price(
                        catalog, account, month, start, end, peaks[account.id], status="final"
                    )
                except Exception as exc:  # one account's failure must not stop the others
                    _record_failure(connect, report, account, month, exc)
                else:
                    priced.append((account, statement))
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = connect()
                _insert_statements(conn, first, priced, on_closed, report)
                continue
            except Exception:
                log.warning(
                    "closing %s: a batch of %d accounts failed; closing them one at a time",
                    month,
                    len(priced),
                    exc_info=True,
                )
            for account, statement in priced:
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect()
                    _insert_statements(conn, first, [(account, statement)], on_closed, report)
                except Exception as exc:  # one account's failure must not stop the others
                    _record_failure(connect, report, account, month, exc)
    finally:
        if conn is not None:
            conn.close()


#: Accounts per transaction when closing: large enough that the commit is a small part of
#: the batch, small enough that the statement's arrays stay a few megabytes.
_BATCH: Final = 500


def _accounts(conn: Conn, account_ref: str | None) -> list[Account]:
    if account_ref is not None:
        return [get_account(conn, account_ref)]
    with conn.cursor(row_factory=class_row(Account)) as cur:
        return cur.execute("SELECT * FROM accounts ORDER BY ref").fetchall()


def _insert_statements(
    conn: Conn,
    first: date,
    priced: list[tuple[Account, Statement]],
    on_closed: Callable[[Conn, int], None] | None,
    report: CloseReport,
) -> None:
    """The statements, their lines and peaks in one transaction; the report once committed."""
    if not priced:
        return
    statements = [statement for _, statement in priced]
    lines = [(account.id, n, x) for account, st in priced for n, x in enumerate(st.lines, 1)]
    peaks = [(account.id, p) for account, st in priced for p in st.peaks.values()]
    with conn.transaction():
        rows = conn.execute(
            _INSERT_STATEMENTS,
            {
                "month": first,
                "closed_by": _CLOSER,
                "account_id": [account.id for account, _ in priced],
                "timezone": [account.timezone for account, _ in priced],
                "period_start": [x.period_start for x in statements],
                "period_end": [x.period_end for x in statements],
                "plan": [x.plan for x in statements],
                "currency": [x.currency for x in statements],
                "subtotal": [x.subtotal for x in statements],
                "tax_rate": [x.tax_rate for x in statements],
                "tax": [x.tax for x in statements],
                "credits_applied": [x.credits_applied for x in statements],
                "amount_due": [x.amount_due for x in statements],
                "due_date": [x.due_date for x in statements],
                "line_account": [account_id for account_id, _, _ in lines],
                "line_no": [n for _, n, _ in lines],
                "kind": [x.kind for _, _, x in lines],
                "device_class": [x.device_class for _, _, x in lines],
                "description": [x.description for _, _, x in lines],
                "quantity": [x.quantity for _, _, x in lines],
                "unit_price": [x.unit_price for _, _, x in lines],
                "amount": [x.amount for _, _, x in lines],
                "tier": [x.tier for _, _, x in lines],
                "tier_from": [x.tier_from for _, _, x in lines],
                "tier_to": [x.tier_to for _, _, x in lines],
                "peak_account": [account_id for account_id, _ in peaks],
                "peak_class": [p.device_class for _, p in peaks],
                "peak": [p.peak for _, p in peaks],
                "peak_at": [p.peak_at for _, p in peaks],
                # text[][] cannot be ragged: each device list travels as one string.
                "device_ids": ["\x1f".join(p.device_ids) for _, p in peaks],
            },
        ).fetchall()
        inserted = {int(row["account_id"]): int(row["id"]) for row in rows}
        if on_closed is not None:
            for statement_id in inserted.values():
                on_closed(conn, statement_id)
    for account, _ in priced:
        # Not inserted: another closer got there first (the unique key waited for it).
        (report.closed if account.id in inserted else report.already_closed).append(account.ref)


_CLOSER = f"{socket.gethostname()}:{os.getpid()}"

# One statement writes the statements, their lines and peaks (and clears recorded failures).
_INSERT_STATEMENTS: Final = """
WITH s AS (
    INSERT INTO statements (account_id, month, timezone, period_start, period_end, plan,
        currency, subtotal, tax_rate, tax, credits_applied, amount_due, due_date, closed_by)
    SELECT i.account_id, %(month)s, i.timezone, i.period_start, i.period_end, i.plan,
        i.currency, i.subtotal, i.tax_rate, i.tax, i.credits_applied, i.amount_due,
        i.due_date, %(closed_by)s
    FROM unnest(%(account_id)s::bigint[], %(timezone)s::text[], %(period_start)s::timestamptz[],
        %(period_end)s::timestamptz[], %(plan)s::text[], %(currency)s::text[],
        %(subtotal)s::numeric[], %(tax_rate)s::numeric[], %(tax)s::numeric[],
        %(credits_applied)s::numeric[], %(amount_due)s::numeric[], %(due_date)s::date[])
        AS i(account_id, timezone, period_start, period_end, plan, currency, subtotal,
             tax_rate, tax, credits_applied, amount_due, due_date)
    -- Idempotent close: a second closer's insert waits for the first to commit, then skips
    -- the account, whose lines and peaks below then have no statement to attach to.
    ON CONFLICT (account_id, month) DO NOTHING
    RETURNING id, account_id
), lines AS (
    INSERT INTO statement_lines (statement_id, line_no, kind, device_class, description,
        quantity, unit_price, amount, tier, tier_from, tier_to)
    SELECT s.id, l.line_no, l.kind, l.device_class, l.description, l.quantity, l.unit_price,
        l.amount, l.tier, l.tier_from, l.tier_to
    FROM unnest(%(line_account)s::bigint[], %(line_no)s::int[], %(kind)s::text[],
        %(device_class)s::text[], %(description)s::text[], %(quantity)s::int[],
        %(unit_price)s::numeric[], %(amount)s::numeric[], %(tier)s::int[],
        %(tier_from)s::int[], %(tier_to)s::int[])
        AS l(account_id, line_no, kind, device_class, description, quantity, unit_price,
             amount, tier, tier_from, tier_to)
    JOIN s USING (account_id)
), peaks AS (
    INSERT INTO statement_peaks (statement_id, device_class, peak, peak_at, device_ids)
    SELECT s.id, p.device_class, p.peak, p.peak_at,
           CASE WHEN p.ids = '' THEN '{}'::text[] ELSE string_to_array(p.ids, E'\x1f') END
    FROM unnest(%(peak_account)s::bigint[], %(peak_class)s::text[], %(peak)s::int[],
        %(peak_at)s::timestamptz[], %(device_ids)s::text[])
        AS p(account_id, device_class, peak, peak_at, ids)
    JOIN s USING (account_id)
), cleared AS (
    DELETE FROM close_failures f USING s
    WHERE f.account_id = s.account_id AND f.month = %(month)s
)
SELECT account_id, id FROM s
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
