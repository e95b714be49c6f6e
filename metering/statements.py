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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import class_row, dict_row

from devmeter.errors import ConflictError, InvalidError
from metering import credits, usage_model
from metering.catalog import Catalog, Plan, Rounding, distinct_classes
from metering.contracts import MonthTerms, month_terms
from metering.peak import ClassPeak, month_bounds, parse_month
from metering.peak_frame import EndStates, close_peaks, peaks
from metering.plans import plans_at
from metering.pricing import (
    Line,
    format_money,
    overage_amount,
    price_month,
    round_money,
    tax_amount,
)
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
    #: The plan that prices the month: in force at its first instant (P6).
    plan: str = ""
    #: A closed month recomputed from every event stored now, late ones included (C2); its
    #: difference from ``classes`` (what was billed) is adjusted on the next statement.
    corrected: dict[str, ClassPeak] | None = None
    #: The month priced.
    statement: Statement | None = None
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
    conn: Conn,
    catalog: Catalog,
    account_ref: str,
    month: str,
    *,
    now: datetime,
    priced: bool = True,
    evidence: bool = True,
) -> Usage:
    """The month's usage, priced (``Usage.statement``): final as closed, else preliminary,
    counted and priced at the plan in force at the month's first instant (P6, M6). With
    ``priced=False`` an open month is only counted (its plan may be unable to price it).

    Without ``evidence`` (the devices behind each peak) the quantities are read from the
    maintained figures (metering.usage_model), not replayed from the events."""
    account = get_account(conn, account_ref)
    start, end = month_bounds(month, account.timezone)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        distinct = _distinct(catalog, stored["plan"])
        return Usage(
            account.ref,
            month,
            "final",
            start,
            end,
            _stored_peaks(conn, stored["id"], evidence=evidence),
            plan=stored["plan"],
            corrected=_count(conn, account, start, end, distinct, evidence),
            statement=_stored_statement(conn, account, month, stored, evidence=evidence),
            distinct=distinct,
        )
    _refuse_future(account, month, start, now)
    contract = month_terms(conn, catalog, [account], start, end).get(account.id)
    plan = (contract and contract.plan) or plans_at(conn, [account], start)[account.id]
    distinct = _distinct(catalog, plan)
    classes = _count(conn, account, start, end, distinct, evidence)
    statement = None
    if priced:
        late = _adjustments(conn, catalog, [account], month, now=now).get(account.id, [])
        statement = _price(
            catalog,
            account,
            month,
            start,
            end,
            classes,
            status="preliminary",
            plan=plan,
            adjustments=late,
            contract=contract,
        )
    return Usage(
        account.ref,
        month,
        "preliminary",
        start,
        end,
        classes,
        plan=plan,
        statement=statement,
        distinct=distinct,
    )


def _count(
    conn: Conn,
    account: Account,
    start: datetime,
    end: datetime,
    distinct: frozenset[str],
    evidence: bool,
) -> dict[str, ClassPeak]:
    """Each class's quantity: read from the maintained figures, or replayed from the events
    when the devices behind it are wanted or the plan counts distinct devices (M6)."""
    if evidence or distinct:
        return peaks(conn, account.id, start, end, distinct=distinct)
    return usage_model.month_peaks(conn, account.id, start, end, account.timezone)


def get_statement(
    conn: Conn,
    catalog: Catalog,
    account_ref: str,
    month: str,
    *,
    now: datetime,
    evidence: bool = True,
) -> Statement:
    account = get_account(conn, account_ref)
    stored = _stored_statement_row(conn, account.id, month)
    if stored is not None:
        return _stored_statement(conn, account, month, stored, evidence=evidence)
    usage = get_usage(conn, catalog, account_ref, month, now=now, evidence=evidence)
    assert usage.statement is not None
    return usage.statement


@dataclass(frozen=True, slots=True)
class StatementSummary:
    """A final statement's totals, for lists: one query for all months, no lines or peaks."""

    month: str
    plan: str
    currency: str
    subtotal: Decimal
    tax_rate: Decimal
    tax: Decimal
    credits_applied: Decimal
    amount_due: Decimal
    due_date: date
    closed_at: datetime
    #: Its adjustment lines (C2): how many, and what they add up to (tax excluded).
    adjustment_lines: int
    adjustments: Decimal


def list_statements(conn: Conn, account_ref: str) -> list[StatementSummary]:
    """The account's final statements, newest first."""
    account = get_account(conn, account_ref)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT s.month, s.plan, s.currency, s.subtotal, s.tax_rate, s.tax,"
            " s.credits_applied, s.amount_due, s.due_date, s.closed_at,"
            " count(l.statement_id) AS adjustment_lines,"
            " coalesce(sum(l.amount), 0) AS adjustments"
            " FROM statements s LEFT JOIN statement_lines l"
            " ON l.statement_id = s.id AND l.kind = 'adjustment'"
            " WHERE s.account_id = %s GROUP BY s.id ORDER BY s.month DESC",
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


def class_usage(
    statement: Statement, peaks: dict[str, ClassPeak], *, evidence: bool = False
) -> dict[str, dict[str, Any]]:
    """Per class: the quantity, when it was reached and what it costs on the month's plan (its
    usage lines, tax excluded). One shape for usage and statements."""
    amounts: dict[str, Decimal] = {}
    for line in statement.lines:
        if line.kind in ("usage", "overage") and line.device_class is not None:
            amounts[line.device_class] = amounts.get(line.device_class, Decimal(0)) + line.amount
    out: dict[str, dict[str, Any]] = {}
    for c, p in sorted(peaks.items()):
        entry: dict[str, Any] = {
            "peak": p.peak,
            "peak_at": p.peak_at,
            "amount": format_money(amounts.get(c, Decimal(0)), statement.currency),
        }
        if evidence:
            entry["devices"] = list(p.device_ids)
        out[c] = entry
    return out


def _money(d: Decimal, currency: str) -> str:
    return format_money(d, currency)


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
        "usage": class_usage(statement, statement.peaks),
        "lines": [
            {
                "kind": line.kind,
                "class": line.device_class,
                "description": line.description,
                "quantity": line.quantity,
                "unit_price": _money(line.unit_price, currency),
                "amount": _money(line.amount, currency),
                "tier": line.tier,
                "corrects_month": (
                    month_name(line.corrects_month) if line.corrects_month else None
                ),
                "billed_quantity": line.billed_quantity,
                "corrected_quantity": line.corrected_quantity,
                "tax_rate": str(line.tax_rate) if line.tax_rate is not None else None,
            }
            for line in statement.lines
        ],
        "subtotal": _money(statement.subtotal, currency),
        "tax_rate": str(statement.tax_rate),
        "tax": _money(statement.tax, currency),
        "total": _money(statement.subtotal + statement.tax, currency),
        "credits_applied": _money(statement.credits_applied, currency),
        "amount_due": _money(statement.amount_due, currency),
        "due_date": statement.due_date,
        "closed_at": statement.closed_at,
    }
    if evidence:
        document["evidence"] = {c: list(p.device_ids) for c, p in statement.peaks.items()}
    return document


def usage_document(usage: Usage, *, evidence: bool = False) -> dict[str, Any]:
    """A month's usage as the CLI prints it and the API returns it: per class the quantity and
    its amount, the plan that prices the month and its total without and with tax; for a
    closed month, also the quantities recomputed from every event stored now (C2)."""
    st = usage.statement
    assert st is not None, "get_usage prices every month"
    currency = st.currency
    document: dict[str, Any] = {
        "account": usage.account,
        "month": usage.month,
        "status": usage.status,
        "plan": usage.plan,
        "currency": currency,
        "period_start": usage.period_start,
        "period_end": usage.period_end,
        "classes": {
            c: {**entry, "metric": "distinct" if c in usage.distinct else "peak"}
            for c, entry in class_usage(st, usage.classes, evidence=evidence).items()
        },
        "subtotal": _money(st.subtotal, currency),
        "tax_rate": str(st.tax_rate),
        "tax": _money(st.tax, currency),
        "total": _money(st.subtotal + st.tax, currency),
        "credits_applied": _money(st.credits_applied, currency),
        "amount_due": _money(st.amount_due, currency),
    }
    if usage.corrected is not None:
        document["corrected"] = {
            c: {"peak": p.peak, "peak_at": p.peak_at} for c, p in sorted(usage.corrected.items())
        }
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
    plan: str,
    adjustments: Sequence[Line] = (),
    contract: MonthTerms | None = None,
) -> Statement:
    """The month's statement, in the order usage, base fee, discount, adjustments, tax, and
    (at close, under the account's lock) credit points. A month under a contract (issue 12)
    has no base fee and bills the peak above its committed devices (overage)."""
    priced_plan = _plan(catalog, account, plan)
    first = month_start(month)
    # P5: the sign-up month (account time zone) is free when the month's plan says so.
    free = priced_plan.free_signup_month and (
        account.signed_up_on.year,
        account.signed_up_on.month,
    ) == (first.year, first.month)
    priced = price_month(
        priced_plan,
        {c: p.peak for c, p in peaks.items()},
        signup_month_free=free,
        commitments=contract.commitments if contract is not None else None,
    )
    lines = (*priced.lines, *adjustments)
    subtotal = round_money(sum((x.amount for x in lines), Decimal(0)), priced.currency)
    rate, tax = _tax(catalog, account, first, priced.subtotal, adjustments, priced.currency)
    return Statement(
        account=account.ref,
        month=month,
        status=status,
        plan=plan,
        currency=priced.currency,
        period_start=start,
        period_end=end,
        lines=lines,
        subtotal=subtotal,
        tax_rate=rate,
        tax=tax,
        # Points are taken at close, under the account's lock (_take_credits).
        credits_applied=Decimal(0),
        amount_due=subtotal + tax,
        due_date=due_date(month),
        closed_at=None,
        peaks=peaks,
    )


def _plan(catalog: Catalog, account: Account, name: str) -> Plan:
    found = catalog.plans.get(name)
    if found is None:
        raise InvalidError(
            f"account {account.ref!r} is on plan {name!r}, which the catalog lacks",
            field="plan",
        )
    return found


def _tax(
    catalog: Catalog,
    account: Account,
    first: date,
    own: Decimal,
    adjustments: Sequence[Line],
    currency: str,
) -> tuple[Decimal, Decimal]:
    """P3: the month's own amount at the rate in force on its first day, each adjustment at the
    rate of the month it corrects (C2); rounded once per rate, never per line."""
    table = catalog.tax_table(account.country)
    rate = table.rate_on(first)
    taxable: dict[tuple[Decimal, Rounding], Decimal] = {(rate.rate, rate.rounding): own}
    for line in adjustments:
        assert line.corrects_month is not None
        corrected = table.rate_on(line.corrects_month)
        key = (corrected.rate if line.tax_rate is None else line.tax_rate, corrected.rounding)
        taxable[key] = taxable.get(key, Decimal(0)) + line.amount
    tax = sum(
        (tax_amount(amount, r, currency, rounding) for (r, rounding), amount in taxable.items()),
        Decimal(0),
    )
    return rate.rate, round_money(tax, currency)


#: Events received this close to an account's last close are looked at again by the next one:
#: a transaction that began before the close may commit after it, unseen by both the close
#: and the late-event trigger. Looking again is harmless: an adjustment is made only where the
#: recomputed month differs.
LATE_MARGIN: Final = timedelta(hours=1)

_LATE_EVENTS: Final = """
WITH last AS (
    SELECT DISTINCT ON (account_id) id, account_id, closed_at, period_end
    FROM statements
    WHERE account_id = ANY(%(ids)s::bigint[]) AND month < %(month)s
    ORDER BY account_id, month DESC
), noted AS (
    -- Noted by the trigger on device_state_events as they were stored (and by sweep_racing).
    SELECT x.account_id, x.event_time AS time
    FROM last l
    JOIN late_events x ON x.account_id = l.account_id
    WHERE x.received_at > l.closed_at - %(margin)s AND x.event_time < l.period_end
), unswept AS (
    SELECT * FROM last l
    WHERE NOT EXISTS (SELECT 1 FROM racing_sweeps r WHERE r.statement_id = l.id)
), racing AS (
    -- Stored while the previous close was committing, before its statement was visible; looked
    -- for here only until sweep_racing has noted them.
    SELECT e.account_id, e.time
    FROM device_state_events e
    JOIN unswept l USING (account_id)
    WHERE e.received_at BETWEEN (SELECT min(closed_at) FROM unswept) - %(margin)s
                            AND (SELECT max(closed_at) FROM unswept) + %(margin)s
      AND e.received_at BETWEEN l.closed_at - %(margin)s AND l.closed_at + %(margin)s
      AND e.time < l.period_end
)
SELECT account_id, min(time) AS since
FROM (SELECT * FROM noted UNION ALL SELECT * FROM racing) late
GROUP BY account_id
"""

# Statements whose margin has passed and whose racing events are not noted yet: the events
# received around each close, for the months it closed, go to late_events once. Two sweepers
# do not note twice: the second waits on the first's racing_sweeps row and then skips it.
_SWEEP_RACING: Final = """
WITH due AS (
    SELECT s.id, s.account_id, s.closed_at, s.period_end
    FROM statements s
    WHERE s.closed_at < coalesce(%(now)s, now()) - %(margin)s
      AND NOT EXISTS (SELECT 1 FROM racing_sweeps r WHERE r.statement_id = s.id)
    -- Oldest first, so a batch's closes lie close together in received_at.
    ORDER BY s.closed_at
    LIMIT %(limit)s
), found AS (
    SELECT d.id, e.account_id, e.time, e.received_at
    FROM due d
    JOIN device_state_events e ON e.account_id = d.account_id
    WHERE e.received_at BETWEEN (SELECT min(closed_at) FROM due) - %(margin)s
                            AND (SELECT max(closed_at) FROM due) + %(margin)s
      AND e.received_at BETWEEN d.closed_at - %(margin)s AND d.closed_at + %(margin)s
      AND e.time < d.period_end
), swept AS (
    INSERT INTO racing_sweeps (statement_id, noted)
    SELECT d.id, (SELECT count(*) FROM found f WHERE f.id = d.id) FROM due d
    ON CONFLICT (statement_id) DO NOTHING
    RETURNING statement_id
), noted AS (
    INSERT INTO late_events (account_id, event_time, received_at)
    SELECT f.account_id, f.time, f.received_at FROM found f JOIN swept w ON w.statement_id = f.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM swept) AS statements, (SELECT count(*) FROM noted) AS events
"""


def sweep_racing(conn: Conn, *, now: datetime | None = None, limit: int = 200) -> tuple[int, int]:
    """Note in ``late_events`` the events stored around each close whose margin has passed
    (LATE_MARGIN after ``closed_at``, by the database's clock unless ``now`` is given), so
    reads stop looking for them among the events. Returns (statements swept, events noted).
    Idempotent; the scheduler calls it on every tick until nothing is left."""
    swept = events = 0
    while True:
        with conn.transaction():
            row = conn.execute(
                _SWEEP_RACING, {"now": now, "margin": LATE_MARGIN, "limit": limit}
            ).fetchone()
        assert row is not None
        statements, noted = int(row["statements"]), int(row["events"])
        swept, events = swept + statements, events + noted
        if statements < limit:
            return swept, events


def _adjustments(
    conn: Conn, catalog: Catalog, accounts: Sequence[Account], month: str, *, now: datetime
) -> dict[int, list[Line]]:
    """C2: adjustment lines for ``month``'s statement of each account, one per closed month
    and class whose recomputed quantity differs from what has been billed for it so far."""
    del now  # the events stored now are the truth; kept for symmetry with the callers
    if not accounts:
        return {}
    found: dict[int, list[Line]] = {}
    late = conn.execute(
        _LATE_EVENTS,
        {"ids": [a.id for a in accounts], "month": month_start(month), "margin": LATE_MARGIN},
    ).fetchall()
    by_id = {a.id: a for a in accounts}
    for row in late:
        account = by_id[row["account_id"]]
        lines = _account_adjustments(conn, catalog, account, month, row["since"])
        if lines:
            found[account.id] = lines
    return found


def _account_adjustments(
    conn: Conn, catalog: Catalog, account: Account, month: str, since: datetime
) -> list[Line]:
    with conn.cursor(row_factory=dict_row) as cur:
        closed = cur.execute(
            "SELECT id, month, period_start, period_end, plan, currency, tax_rate FROM statements"
            " WHERE account_id = %s AND month < %s AND period_end > %s ORDER BY month",
            (account.id, month_start(month), since),
        ).fetchall()
        if not closed:
            return []
        # Billed so far per (month, class): the statement's peak, or the quantity the latest
        # adjustment corrected it to.
        billed: dict[tuple[date, str], int] = {}
        for p in cur.execute(
            "SELECT s.month, p.device_class, p.peak FROM statement_peaks p"
            " JOIN statements s ON s.id = p.statement_id WHERE s.id = ANY(%s)",
            ([c["id"] for c in closed],),
        ):
            billed[(p["month"], p["device_class"])] = p["peak"]
        for a in cur.execute(
            "SELECT l.corrects_month, l.device_class, l.corrected_quantity FROM statement_lines l"
            " JOIN statements s ON s.id = l.statement_id"
            " WHERE s.account_id = %s AND l.kind = 'adjustment' AND l.corrects_month = ANY(%s)"
            " ORDER BY s.month, l.line_no",
            (account.id, [c["month"] for c in closed]),
        ):
            billed[(a["corrects_month"], a["device_class"])] = a["corrected_quantity"]
    lines: list[Line] = []
    for c in closed:
        first: date = c["month"]
        plan = _plan(catalog, account, c["plan"])
        recomputed = peaks(
            conn,
            account.id,
            c["period_start"],
            c["period_end"],
            distinct=_distinct(catalog, c["plan"]),
        )
        corrected = {k: p.peak for k, p in recomputed.items()}
        classes = sorted({k for (m, k) in billed if m == first} | set(corrected))
        free = plan.free_signup_month and (
            account.signed_up_on.year,
            account.signed_up_on.month,
        ) == (first.year, first.month)
        # A month under a contract billed only the peak above its commitments (issue 12):
        # so is its correction.
        terms = month_terms(conn, catalog, [account], c["period_start"], c["period_end"])
        committed = terms[account.id].commitments if account.id in terms else {}
        for k in classes:
            old, new = billed.get((first, k), 0), corrected.get(k, 0)
            if old == new:
                continue
            if k not in plan.classes:
                raise InvalidError(
                    f"device class {k!r} is not priced by plan {plan.name!r}", field="device_class"
                )
            pricing = plan.classes[k]
            amount = Decimal(0)
            if not free:
                held = committed.get(k, 0)
                amount = overage_amount(k, pricing, new, held, plan.currency) - overage_amount(
                    k, pricing, old, held, plan.currency
                )
            amount = round_money(amount, plan.currency)
            lines.append(
                Line(
                    kind="adjustment",
                    device_class=k,
                    description=f"adjustment {month_name(first)} {k}: peak {old} \u2192 {new}",
                    quantity=1,
                    unit_price=amount,
                    amount=amount,
                    corrects_month=first,
                    billed_quantity=old,
                    corrected_quantity=new,
                    tax_rate=c["tax_rate"],
                )
            )
    return lines


def _stored_statement_row(conn: Conn, account_id: int, month: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM statements WHERE account_id = %s AND month = %s",
            (account_id, month_start(month)),
        ).fetchone()


def _stored_peaks(conn: Conn, statement_id: int, *, evidence: bool = True) -> dict[str, ClassPeak]:
    # A month of a large account holds tens of thousands of ids: read them only when wanted.
    ids = "device_ids" if evidence else "'{}'::text[] AS device_ids"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT device_class, peak, peak_at, {ids} FROM statement_peaks"
            " WHERE statement_id = %s ORDER BY device_class",
            (statement_id,),
        ).fetchall()
    return {
        r["device_class"]: ClassPeak(
            r["device_class"], r["peak"], r["peak_at"].astimezone(UTC), tuple(r["device_ids"])
        )
        for r in rows
    }


def _stored_statement(
    conn: Conn, account: Account, month: str, row: dict[str, Any], *, evidence: bool = True
) -> Statement:
    with conn.cursor(row_factory=dict_row) as cur:
        lines = cur.execute(
            "SELECT kind, device_class, description, quantity, unit_price, amount, tier,"
            " tier_from, tier_to, corrects_month, billed_quantity, corrected_quantity, tax_rate"
            " FROM statement_lines WHERE statement_id = %s ORDER BY line_no",
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
        peaks=_stored_peaks(conn, row["id"], evidence=evidence),
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
    # Accounts share one peaks query per time zone (and set of classes counted as distinct).
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
                plans = plans_at(conn, group, start)
                # A month under a contract is priced at the contract's plan (issue 12).
                contracts = month_terms(conn, catalog, group, start, end)
                for account_id, terms in contracts.items():
                    if terms.plan is not None:
                        plans[account_id] = terms.plan
                by_metric: dict[frozenset[str], list[int]] = {}
                for account in group:
                    by_metric.setdefault(_distinct(catalog, plans[account.id]), []).append(
                        account.id
                    )
                peaks: dict[int, dict[str, ClassPeak]] = {}
                end_states: EndStates = {}
                for distinct, ids in sorted(by_metric.items(), key=lambda x: sorted(x[0])):
                    found, states = close_peaks(conn, ids, start, end, distinct=distinct)
                    peaks.update(found)
                    end_states.update(states)
                late = _adjustments(conn, catalog, group, month, now=now)
        except Exception as exc:  # this zone's accounts fail (recorded, retried); others go on
            for account in group:
                _record_failure(connect, report, account, month, exc)
            continue
        _close_group(
            connect,
            catalog,
            report,
            group,
            month,
            start,
            end,
            peaks,
            on_closed,
            plans=plans,
            late=late,
            end_states=end_states,
            contracts=contracts,
            now=now,
        )
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
    *,
    plans: dict[int, str],
    late: dict[int, list[Line]],
    end_states: EndStates,
    contracts: Mapping[int, MonthTerms],
    now: datetime,
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
                        catalog,
                        account,
                        month,
                        start,
                        end,
                        peaks[account.id],
                        status="final",
                        plan=plans[account.id],
                        adjustments=late.get(account.id, ()),
                        contract=contracts.get(account.id),
                    )
                except Exception as exc:  # one account's failure must not stop the others
                    _record_failure(connect, report, account, month, exc)
                else:
                    priced.append((account, statement))
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = connect()
                _insert_statements(conn, first, priced, on_closed, report, now, end_states)
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
                    _insert_statements(
                        conn, first, [(account, statement)], on_closed, report, now, end_states
                    )
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
    now: datetime,
    end_states: EndStates | None = None,
) -> None:
    """The statements, their lines and peaks in one transaction; the report once committed.

    The accounts' rows are locked first (in id order, so two closers cannot deadlock): a
    second closer of an account waits, then finds the statement and skips it; and credit
    points are taken under that lock, so two closes never spend the same points (P4).
    """
    if not priced:
        return
    with conn.transaction():
        ids = sorted(account.id for account, _ in priced)
        conn.execute("SELECT id FROM accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))
        done = {
            row["account_id"]
            for row in conn.execute(
                "SELECT account_id FROM statements WHERE month = %s AND account_id = ANY(%s)",
                (first, ids),
            )
        }
        for account, _ in priced:
            if account.id in done:
                report.already_closed.append(account.ref)
        priced = [(a, st) for a, st in priced if a.id not in done]
        uses = _take_credits(conn, priced, first, now)
        priced = [
            (a, replace(st, credits_applied=applied, amount_due=st.amount_due - applied))
            for a, st in priced
            for applied in [credits.money_of(sum(p for _, p in uses.get(a.id, [])), st.currency)]
        ]
        inserted = _insert_locked(conn, first, priced, on_closed)
        for account, _ in priced:
            statement_id = inserted.get(account.id)
            if statement_id is not None:
                credits.record_uses(conn, account.id, statement_id, uses.get(account.id, []), now)
        credits.expire(conn, ids, now)
        if end_states is not None:
            _write_snapshots(
                conn,
                [(a.id, st.period_end) for a, st in priced if a.id in inserted],
                end_states,
            )
    for account, _ in priced:
        # Not inserted: another closer got there first (the unique key waited for it).
        (report.closed if account.id in inserted else report.already_closed).append(account.ref)


def _write_snapshots(conn: Conn, closed: list[tuple[int, datetime]], end_states: EndStates) -> None:
    """The devices Active at the end of each closed month: where the next close starts."""
    closed = [(a, boundary) for a, boundary in closed if a in end_states]
    if not closed:
        return
    devices = [(a, d, c) for a, _ in closed for d, c in end_states[a]]
    conn.execute(
        """
        WITH s AS (
            INSERT INTO month_snapshots (account_id, boundary)
            SELECT * FROM unnest(%(ids)s::bigint[], %(bounds)s::timestamptz[])
            ON CONFLICT DO NOTHING
            RETURNING account_id, boundary
        )
        INSERT INTO device_month_states (account_id, boundary, device_id, device_class)
        SELECT d.account_id, s.boundary, d.device_id, d.device_class
        FROM unnest(%(d_account)s::bigint[], %(d_id)s::text[], %(d_class)s::text[])
             AS d (account_id, device_id, device_class)
        JOIN s USING (account_id)
        """,
        {
            "ids": [a for a, _ in closed],
            "bounds": [b for _, b in closed],
            "d_account": [a for a, _, _ in devices],
            "d_id": [d for _, d, _ in devices],
            "d_class": [c for _, _, c in devices],
        },
    )


def _take_credits(
    conn: Conn, priced: list[tuple[Account, Statement]], first: date, now: datetime
) -> dict[int, list[tuple[int, int]]]:
    """Which grants pay which statement (P4), read under the accounts' lock."""
    owed = {a.id: st for a, st in priced if st.amount_due > 0}
    if not owed:
        return {}
    last_day = date(first.year, first.month, calendar.monthrange(first.year, first.month)[1])
    grants = credits.grants_of(conn, list(owed))
    return {
        account_id: credits.plan_use(
            credits.points_of(st.amount_due, st.currency), grants[account_id], last_day, now
        )
        for account_id, st in owed.items()
        if account_id in grants
    }


def _insert_locked(
    conn: Conn,
    first: date,
    priced: list[tuple[Account, Statement]],
    on_closed: Callable[[Conn, int], None] | None,
) -> dict[int, int]:
    if not priced:
        return {}
    statements = [statement for _, statement in priced]
    lines = [(account.id, n, x) for account, st in priced for n, x in enumerate(st.lines, 1)]
    peaks = [(account.id, p) for account, st in priced for p in st.peaks.values()]
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
            "corrects_month": [x.corrects_month for _, _, x in lines],
            "billed_quantity": [x.billed_quantity for _, _, x in lines],
            "corrected_quantity": [x.corrected_quantity for _, _, x in lines],
            "line_tax_rate": [x.tax_rate for _, _, x in lines],
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
    return inserted


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
        quantity, unit_price, amount, tier, tier_from, tier_to, corrects_month,
        billed_quantity, corrected_quantity, tax_rate)
    SELECT s.id, l.line_no, l.kind, l.device_class, l.description, l.quantity, l.unit_price,
        l.amount, l.tier, l.tier_from, l.tier_to, l.corrects_month, l.billed_quantity,
        l.corrected_quantity, l.tax_rate
    FROM unnest(%(line_account)s::bigint[], %(line_no)s::int[], %(kind)s::text[],
        %(device_class)s::text[], %(description)s::text[], %(quantity)s::int[],
        %(unit_price)s::numeric[], %(amount)s::numeric[], %(tier)s::int[],
        %(tier_from)s::int[], %(tier_to)s::int[], %(corrects_month)s::date[],
        %(billed_quantity)s::int[], %(corrected_quantity)s::int[], %(line_tax_rate)s::numeric[])
        AS l(account_id, line_no, kind, device_class, description, quantity, unit_price,
             amount, tier, tier_from, tier_to, corrects_month, billed_quantity,
             corrected_quantity, tax_rate)
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
