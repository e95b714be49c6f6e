"""Plan history (SPEC P6): which plan prices a month.

A change takes effect for the service at once (``accounts.plan`` is the plan in force now),
and the month in which it happens is billed at the plan in force when that month began: a
change at exactly a month's first instant prices that month, one a second later the next.
Every change is a row of ``plan_changes``; the sign-up plan is the first, in force from the
first instant of the sign-up day, and also prices the sign-up month (which began before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from devmeter.errors import ConflictError, InvalidError
from metering.catalog import Catalog
from metering.registry import Account

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class PlanChange:
    plan: str
    effective_at: datetime
    recorded_at: datetime
    changed_by: str


@dataclass(frozen=True, slots=True)
class PlanChangeResult:
    account: str
    plan: str
    previous_plan: str
    effective_at: datetime
    #: The first month priced at the new plan (YYYY-MM, account time zone).
    first_month: str
    changed: bool


def history(conn: Conn, account_id: int) -> list[PlanChange]:
    """The account's plans, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT plan, effective_at, recorded_at, changed_by FROM plan_changes"
            " WHERE account_id = %s ORDER BY effective_at, id",
            (account_id,),
        ).fetchall()
    return [
        PlanChange(
            r["plan"],
            r["effective_at"].astimezone(UTC),
            r["recorded_at"].astimezone(UTC),
            r["changed_by"],
        )
        for r in rows
    ]


def plans_at(conn: Conn, accounts: Sequence[Account], at: datetime) -> dict[int, str]:
    """The plan in force at ``at`` for each account (a month: its first instant).

    Before the first recorded change (the sign-up month began before the sign-up), the first
    plan; an account without history (none is written without one) keeps ``accounts.plan``.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """
            SELECT DISTINCT ON (account_id) account_id, plan
            FROM plan_changes
            WHERE account_id = ANY(%(ids)s::bigint[])
            ORDER BY account_id, (effective_at <= %(at)s) DESC,
                     CASE WHEN effective_at <= %(at)s THEN effective_at END DESC,
                     effective_at, id DESC
            """,
            {"ids": [a.id for a in accounts], "at": at},
        ).fetchall()
    found = {r["account_id"]: r["plan"] for r in rows}
    return {a.id: found.get(a.id, a.plan) for a in accounts}


def change_plan(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    plan: str,
    *,
    at: datetime,
    now: datetime,
    changed_by: str,
) -> PlanChangeResult:
    """Move the account to ``plan`` from ``at`` (default now; never in the future).

    Refused: an unknown plan, a plan in another currency (credit points and closed months are
    in the account's currency), an instant in the future, before the latest recorded change,
    or at or before the first instant of the latest closed month (that month's price is final).
    The same plan again is not a change: nothing is written.
    """
    from metering.peak import month_bounds
    from metering.statements import month_name

    if plan not in catalog.plans:
        known = ", ".join(sorted(catalog.plans))
        raise InvalidError(f"unknown plan {plan!r} (catalog has: {known})", field="plan")
    if at.tzinfo is None:
        raise InvalidError("at needs a UTC offset, e.g. 2026-11-01T00:00:00+09:00", field="at")
    if at > now + timedelta(seconds=5):
        raise InvalidError(
            f"at {at.isoformat()} is in the future: a plan change takes effect when it is made",
            field="at",
        )
    # Serialize with closes and other changes of this account.
    with conn.cursor(row_factory=dict_row) as cur:
        locked = cur.execute(
            "SELECT plan FROM accounts WHERE id = %s FOR UPDATE", (account.id,)
        ).fetchone()
    assert locked is not None
    current: str = locked["plan"]
    old = catalog.plans.get(current)
    new = catalog.plans[plan]
    if old is not None and old.currency != new.currency:
        raise InvalidError(
            f"plan {plan!r} bills in {new.currency}, the account in {old.currency}: "
            "a plan change cannot change the account's currency",
            field="plan",
        )
    from metering.contracts import in_force

    if in_force(conn, catalog, account, at) or in_force(conn, catalog, account, now):
        # The contract's plan prices its terms and its months; a change outside it would
        # leave the two disagreeing.
        raise ConflictError(
            f"account {account.ref!r} has a contract: change its plan with "
            f"`devmeter contracts change --account {account.ref} --plan {plan}` "
            "(POST /v1/contract/change), which also says what the change costs",
            field="plan",
        )
    first_month = first_month_priced(at, account.timezone)
    if plan == current:
        return PlanChangeResult(account.ref, plan, current, at, first_month, changed=False)
    with conn.cursor(row_factory=dict_row) as cur:
        latest = cur.execute(
            "SELECT max(effective_at) AS at FROM plan_changes WHERE account_id = %s",
            (account.id,),
        ).fetchone()
        closed = cur.execute(
            "SELECT max(month) AS month FROM statements WHERE account_id = %s", (account.id,)
        ).fetchone()
    if latest and latest["at"] is not None and at < latest["at"]:
        raise ConflictError(
            f"at {at.isoformat()} is before the account's latest plan change "
            f"({latest['at'].astimezone(UTC).isoformat()}): changes are recorded in order",
            field="at",
        )
    if closed and closed["month"] is not None:
        month = month_name(closed["month"])
        start = month_bounds(month, account.timezone)[0]
        if at <= start:
            raise ConflictError(
                f"month {month} is closed: a plan change at or before its first instant "
                f"({start.isoformat()}) would reprice it; use a later instant",
                field="at",
            )
    conn.execute(
        "INSERT INTO plan_changes (account_id, plan, effective_at, changed_by)"
        " VALUES (%s, %s, %s, %s)",
        (account.id, plan, at, changed_by),
    )
    conn.execute("UPDATE accounts SET plan = %s WHERE id = %s", (plan, account.id))
    return PlanChangeResult(account.ref, plan, current, at, first_month, changed=True)


def first_month_priced(at: datetime, tz: str) -> str:
    """The month from which a change at ``at`` prices: its own if at its first instant."""
    from zoneinfo import ZoneInfo

    local = at.astimezone(ZoneInfo(tz))
    year, month = local.year, local.month
    first_instant = local.day == 1 and local.time() == local.time().min
    if not first_instant:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return f"{year:04d}-{month:02d}"


def follow_contract(conn: Conn, account_id: int, plan: str, at: datetime, changed_by: str) -> bool:
    """Record a contract's plan change (issue 12) in the plan history, once per ``changed_by``.

    The contract has already decided when it takes effect (at once, or at a term's end), so
    nothing here refuses it. The history stays in order: a contract dated before the
    account's recorded history (a back-dated start) is recorded at the history's latest
    instant. ``accounts.plan`` becomes the plan if this is now the latest change.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        seen = cur.execute(
            "SELECT 1 FROM plan_changes WHERE account_id = %s AND changed_by = %s",
            (account_id, changed_by),
        ).fetchone()
        if seen is not None:
            return False
        latest = cur.execute(
            "SELECT max(effective_at) AS at FROM plan_changes WHERE account_id = %s",
            (account_id,),
        ).fetchone()
    effective = at
    if latest and latest["at"] is not None and latest["at"] > at:
        effective = latest["at"]
    conn.execute(
        "INSERT INTO plan_changes (account_id, plan, effective_at, changed_by)"
        " VALUES (%s, %s, %s, %s)",
        (account_id, plan, effective, changed_by),
    )
    conn.execute(
        "UPDATE accounts SET plan = (SELECT plan FROM plan_changes WHERE account_id = %(id)s"
        " ORDER BY effective_at DESC, id DESC LIMIT 1) WHERE id = %(id)s",
        {"id": account_id},
    )
    return True
