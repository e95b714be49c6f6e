"""Credit points (SPEC P4): grants, their use at month close, their expiry; one ledger.

1 point is 1 minor unit of the account's currency (1 JPY, 1 US cent), so points are integers
and a statement's ``credits_applied`` is exact. At close, points pay the amount after tax,
from the grant that expires first (grants without an expiry last, then the oldest); a grant
pays a month when it exists at the close and its expiry day (inclusive, account time zone) is
on or after the month's last day. Every grant, use and expiry is a row of ``credit_ledger``;
the balance is their sum and never negative: the close takes points while it holds the
account's row lock (metering.statements), so two closes of one account take turns.

The choice of grants is pure (``plan_use``); the rest reads and writes the ledger inside the
caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

from devmeter.errors import InvalidError
from metering.catalog import CURRENCY_MINOR_UNITS
from metering.registry import Account

Conn = psycopg.Connection[Any]
EntryKind = Literal["grant", "use", "expiry"]

#: A grant larger than this is a typo, not a credit (10^12 yen).
MAX_GRANT: Final = 10**12
MAX_REASON: Final = 500


@dataclass(frozen=True, slots=True)
class Grant:
    id: int
    points: int
    #: What is left of it: its points less its uses and expiry.
    remaining: int
    granted_at: datetime
    expires_on: date | None


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    kind: EntryKind
    points: int
    at: datetime
    grant_id: int | None
    expires_on: date | None
    reason: str | None
    #: The month a use paid (YYYY-MM).
    month: str | None


@dataclass(frozen=True, slots=True)
class Balance:
    account: str
    currency: str
    points: int
    ledger: tuple[Entry, ...]
    grants: tuple[Grant, ...]


# --- pure rules --------------------------------------------------------------------------


def points_of(amount: Decimal, currency: str) -> int:
    """An amount in the currency as points (its minor units); it must be exact."""
    scaled = amount.scaleb(CURRENCY_MINOR_UNITS[currency])
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} {currency} is not a whole number of minor units")
    return int(scaled)


def money_of(points: int, currency: str) -> Decimal:
    """Points as an amount in the currency, at its minor unit ("1000", "12.50")."""
    exponent = CURRENCY_MINOR_UNITS[currency]
    return Decimal(points).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))


def pays_month(grant: Grant, month_last_day: date, closed_at: datetime) -> bool:
    """P4: the grant exists at the close and expires on or after the month's last day."""
    return grant.granted_at <= closed_at and (
        grant.expires_on is None or grant.expires_on >= month_last_day
    )


def plan_use(
    owed: int, grants: Sequence[Grant], month_last_day: date, closed_at: datetime
) -> list[tuple[int, int]]:
    """``(grant id, points)`` to take so that points pay ``owed`` (after tax) as far as they go.

    Oldest-expiring first; grants that never expire last; ties by grant instant, then id.
    Nothing is taken for an amount of zero or less (a month that a negative adjustment turned
    into a refund keeps its points).
    """
    usable = sorted(
        (g for g in grants if g.remaining > 0 and pays_month(g, month_last_day, closed_at)),
        key=lambda g: (g.expires_on is None, g.expires_on or date.max, g.granted_at, g.id),
    )
    uses: list[tuple[int, int]] = []
    left = owed
    for grant in usable:
        if left <= 0:
            break
        take = min(grant.remaining, left)
        uses.append((grant.id, take))
        left -= take
    return uses


def last_payable_month(expires_on: date) -> date:
    """The first day of the last month a grant expiring on ``expires_on`` can pay."""
    after = expires_on + timedelta(days=1)
    first = date(after.year, after.month, 1)
    return date(first.year - 1, 12, 1) if first.month == 1 else date(first.year, first.month - 1, 1)


def expiry_instant(expires_on: date, tz: str) -> datetime:
    """The first instant after the expiry day, in the account's time zone."""
    return datetime.combine(expires_on + timedelta(days=1), time(0), ZoneInfo(tz)).astimezone(UTC)


# --- the ledger --------------------------------------------------------------------------


def grant(
    conn: Conn,
    account: Account,
    *,
    points: int,
    reason: str | None,
    expires_on: date | None,
    at: datetime,
    now: datetime,
) -> Entry:
    """Record a grant of ``points`` at ``at`` (not in the future)."""
    if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
        raise InvalidError("points must be a whole number greater than 0", field="points")
    if points > MAX_GRANT:
        raise InvalidError(f"points must be at most {MAX_GRANT}", field="points")
    if reason is not None and len(reason) > MAX_REASON:
        raise InvalidError(f"reason must be at most {MAX_REASON} characters", field="reason")
    if at.tzinfo is None:
        raise InvalidError("at needs a UTC offset, e.g. 2026-10-01T00:00:00+09:00", field="at")
    if at > now + timedelta(seconds=5):
        raise InvalidError(
            f"at {at.isoformat()} is in the future: a grant is recorded when it is made",
            field="at",
        )
    local_day = at.astimezone(ZoneInfo(account.timezone)).date()
    if expires_on is not None and expires_on < local_day:
        raise InvalidError(
            f"expires {expires_on.isoformat()} is before the grant's day "
            f"{local_day.isoformat()} ({account.timezone})",
            field="expires",
        )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO credit_ledger (account_id, kind, points, entry_at, expires_on, reason)"
            " VALUES (%s, 'grant', %s, %s, %s, %s) RETURNING id",
            (account.id, points, at, expires_on, reason),
        ).fetchone()
    assert row is not None
    return Entry(row["id"], "grant", points, at.astimezone(UTC), None, expires_on, reason, None)


def grants_of(conn: Conn, account_ids: Sequence[int]) -> dict[int, list[Grant]]:
    """Every grant of the accounts with what is left of it."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """
            SELECT g.account_id, g.id, g.points, g.entry_at, g.expires_on,
                   g.points + coalesce(sum(x.points), 0) AS remaining
            FROM credit_ledger g
            LEFT JOIN credit_ledger x ON x.grant_id = g.id
            WHERE g.account_id = ANY(%s::bigint[]) AND g.kind = 'grant'
            GROUP BY g.id
            ORDER BY g.id
            """,
            (list(account_ids),),
        ).fetchall()
    found: dict[int, list[Grant]] = {}
    for r in rows:
        found.setdefault(r["account_id"], []).append(
            Grant(r["id"], r["points"], int(r["remaining"]), r["entry_at"], r["expires_on"])
        )
    return found


def record_uses(
    conn: Conn, account_id: int, statement_id: int, uses: Sequence[tuple[int, int]], at: datetime
) -> None:
    if not uses:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO credit_ledger (account_id, kind, points, entry_at, grant_id, statement_id)"
            " VALUES (%s, 'use', %s, %s, %s, %s)",
            [(account_id, -points, at, grant_id, statement_id) for grant_id, points in uses],
        )


def expire(conn: Conn, account_ids: Sequence[int], now: datetime) -> int:
    """Write the expiry of every grant whose last day has passed and that can pay no month
    still to close: the last month it could pay is closed (or before the account's sign-up).

    Until then its points stay in the balance: a grant expiring on 31 October still pays
    October when October closes on 1 November. Returns the entries written.
    """
    result = conn.execute(
        """
        INSERT INTO credit_ledger (account_id, kind, points, entry_at, grant_id)
        SELECT g.account_id, 'expiry', -r.remaining,
               ((g.expires_on + 1)::timestamp AT TIME ZONE a.timezone), g.id
        FROM credit_ledger g
        JOIN accounts a ON a.id = g.account_id
        CROSS JOIN LATERAL (
            SELECT g.points + coalesce(sum(x.points), 0) AS remaining
            FROM credit_ledger x WHERE x.grant_id = g.id
        ) r
        WHERE g.account_id = ANY(%(ids)s::bigint[]) AND g.kind = 'grant'
          AND g.expires_on IS NOT NULL AND r.remaining > 0
          AND ((g.expires_on + 1)::timestamp AT TIME ZONE a.timezone) <= %(now)s
          AND (
              (date_trunc('month', g.expires_on + 1) - interval '1 month')::date
                  < date_trunc('month', a.signed_up_on)::date
              OR EXISTS (
                  SELECT 1 FROM statements s
                  WHERE s.account_id = g.account_id
                    AND s.month = (date_trunc('month', g.expires_on + 1)
                                   - interval '1 month')::date
              )
          )
        ON CONFLICT DO NOTHING
        """,
        {"ids": list(account_ids), "now": now},
    )
    return result.rowcount


def balance(conn: Conn, account: Account, currency: str, *, now: datetime) -> Balance:
    """The account's points and its ledger, oldest first, after writing due expiries."""
    expire(conn, [account.id], now)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """
            SELECT l.id, l.kind, l.points, l.entry_at, l.grant_id, l.expires_on, l.reason,
                   s.month
            FROM credit_ledger l LEFT JOIN statements s ON s.id = l.statement_id
            WHERE l.account_id = %s ORDER BY l.entry_at, l.id
            """,
            (account.id,),
        ).fetchall()
    ledger = tuple(
        Entry(
            r["id"],
            r["kind"],
            r["points"],
            r["entry_at"].astimezone(UTC),
            r["grant_id"],
            r["expires_on"],
            r["reason"],
            f"{r['month']:%Y-%m}" if r["month"] is not None else None,
        )
        for r in rows
    )
    grants = tuple(grants_of(conn, [account.id]).get(account.id, []))
    return Balance(account.ref, currency, sum(e.points for e in ledger), ledger, grants)


def entry_document(e: Entry, remaining: int | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": e.id,
        "kind": e.kind,
        "points": str(e.points),
        "at": e.at,
        "grant_id": e.grant_id,
        "expires_on": e.expires_on,
        "reason": e.reason,
        "month": e.month,
    }
    if e.kind == "grant":
        document["remaining"] = str(e.points if remaining is None else remaining)
    return document


def balance_document(b: Balance) -> dict[str, Any]:
    """``{"balance": "…", "ledger": [...]}`` as the CLI prints it and the API returns it:
    points as decimal strings, the balance also as an amount of the account's currency."""
    remaining = {g.id: g.remaining for g in b.grants}
    return {
        "account": b.account,
        "currency": b.currency,
        "balance": str(b.points),
        "balance_amount": str(money_of(b.points, b.currency)),
        "ledger": [entry_document(e, remaining.get(e.id)) for e in b.ledger],
    }
