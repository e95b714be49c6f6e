"""What the customer owes (issue 10): credit points, plan history, the sign-up month, late
heartbeats, against a real PostgreSQL; and the CLI's and API's refusals, which change nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from devmeter.db import connect
from devmeter.errors import ConflictError, InvalidError
from metering import credits
from metering.plans import change_plan
from metering.registry import get_account, register_device, set_device_state
from metering.statements import (
    LATE_MARGIN,
    close_month,
    get_statement,
    get_usage,
    sweep_racing,
)
from tests.conftest import Cli
from tests.integration.test_close import CATALOG, jst, worked_example

Opener = Callable[[], psycopg.Connection[Any]]
# After October closes (November 1 plus grace) and before November does.
NOV = datetime(2026, 11, 20, tzinfo=UTC)
# After November closes.
DEC = datetime(2026, 12, 5, tzinfo=UTC)


@pytest.fixture
def opener(database_url: str) -> Opener:
    return lambda: connect(database_url)


def _grant(opener: Opener, ref: str, points: int, expires: date | None, at: datetime) -> None:
    with opener() as conn, conn.transaction():
        account = get_account(conn, ref)
        credits.grant(
            conn, account, points=points, reason="test", expires_on=expires, at=at, now=NOV
        )


def _october(opener: Opener, ref: str = "acme") -> Any:
    close_month(opener, CATALOG, "2026-10", now=NOV, account_ref=ref)
    with opener() as conn:
        return get_statement(conn, CATALOG, ref, "2026-10", now=NOV)


@pytest.mark.parametrize(
    ("points", "applied", "due", "left"),
    [
        (5000, "3850", "0", 1150),  # more than the amount after tax
        (3850, "3850", "0", 0),  # exactly it
        (1000, "1000", "2850", 0),  # less: the SPEC's worked example
    ],
)
def test_points_pay_the_amount_after_tax_up_to_the_balance(
    database_url: str, opener: Opener, points: int, applied: str, due: str, left: int
) -> None:
    worked_example(database_url)
    _grant(opener, "acme", points, None, jst(2026, 10, 1))
    statement = _october(opener)
    assert (statement.subtotal, statement.tax) == (Decimal(3500), Decimal(350))
    assert (statement.credits_applied, statement.amount_due) == (Decimal(applied), Decimal(due))
    with opener() as conn:
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=NOV)
    assert balance.points == left
    assert sum(e.points for e in balance.ledger if e.kind == "use") == -int(applied)


@pytest.mark.parametrize(
    ("expires", "pays"),
    [
        (date(2026, 10, 30), False),  # the day before the month's last day
        (date(2026, 10, 31), True),  # on it
        (date(2026, 11, 1), True),  # after it
    ],
)
def test_a_grant_pays_a_month_when_it_expires_on_or_after_its_last_day(
    database_url: str, opener: Opener, expires: date, pays: bool
) -> None:
    worked_example(database_url)
    _grant(opener, "acme", 500, expires, jst(2026, 10, 1))
    statement = _october(opener)
    assert statement.credits_applied == (Decimal(500) if pays else Decimal(0))
    with opener() as conn:
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=NOV)
    kinds = [e.kind for e in balance.ledger]
    if pays:
        assert (balance.points, kinds) == (0, ["grant", "use"])
        return
    # Past its day, but September (the last month it can pay) is still to close: kept.
    assert (balance.points, kinds) == (500, ["grant"])
    close_month(opener, CATALOG, "2026-09", now=NOV, account_ref="acme")
    with opener() as conn:
        september = get_statement(conn, CATALOG, "acme", "2026-09", now=NOV)
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=NOV)
    assert september.credits_applied == Decimal(500)
    assert (balance.points, [e.kind for e in balance.ledger]) == (0, ["grant", "use"])


def test_a_grant_expires_once_it_can_pay_no_month_still_to_close(
    database_url: str, opener: Opener
) -> None:
    worked_example(database_url)
    close_month(opener, CATALOG, "2026-09", now=NOV, account_ref="acme")
    _grant(opener, "acme", 5000, date(2026, 10, 30), jst(2026, 10, 1))
    _october(opener)
    with opener() as conn:
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=NOV)
    expiry = [e for e in balance.ledger if e.kind == "expiry"]
    assert balance.points == 0
    assert [(e.points, e.at) for e in expiry] == [(-5000, jst(2026, 10, 31))]


def test_oldest_expiring_grant_first_and_a_later_grant_waits(
    database_url: str, opener: Opener
) -> None:
    worked_example(database_url)
    _grant(opener, "acme", 3000, None, jst(2026, 10, 1))
    _grant(opener, "acme", 3000, date(2026, 12, 31), jst(2026, 10, 2))
    # Made after the close's instant: it does not exist at the close.
    late = datetime(2026, 11, 21, tzinfo=UTC)
    with opener() as conn, conn.transaction():
        account = get_account(conn, "acme")
        credits.grant(conn, account, points=99, reason=None, expires_on=None, at=late, now=late)
    statement = _october(opener)
    assert statement.credits_applied == Decimal(3850)
    with opener() as conn:
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=NOV)
    remaining = sorted((g.expires_on is None, g.remaining) for g in balance.grants)
    # The expiring grant went first (all 3,000), the other paid the rest (850).
    assert remaining == [(False, 0), (True, 99), (True, 2150)]


def _register(url: str, ref: str, ids: list[str], at: datetime) -> None:
    with connect(url) as conn, conn.transaction():
        for device_id in ids:
            register_device(
                conn, CATALOG, account_ref=ref, device_class="lte-m", device_id=device_id, at=at
            )


def test_two_closes_racing_one_statement_and_a_ledger_that_adds_up(
    cli: Cli, database_url: str
) -> None:
    """Two processes close the same month, two more two months at once: points never go
    negative and every point taken is on a statement."""
    ok = _ok
    ok(cli("accounts", "create", "--ref", "acme", "--name", "A", "--plan", "standard",
           "--country", "JP", "--tz", "Asia/Tokyo", "--signed-up", "2026-09-01"))  # fmt: skip
    _register(database_url, "acme", [f"d{n}" for n in range(1, 13)], jst(2026, 9, 30, 10))
    ok(cli("credits", "grant", "--account", "acme", "--points", "5000"))
    results: list[Any] = []

    def close(month: str) -> None:
        results.append(cli("close", "--month", month, "--account", "acme", timeout=120))

    threads = [threading.Thread(target=close, args=(m,)) for m in ("2026-10", "2026-10")]
    threads += [threading.Thread(target=close, args=(m,)) for m in ("2026-09", "2026-11")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert [r.code for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    statements = [
        ok(cli("statement", "--account", "acme", "--month", m))
        for m in ("2026-09", "2026-10", "2026-11")
    ]
    # 12 devices: 3,500 + 350 = 3,850 each month (September from its 30th).
    assert [s["status"] for s in statements] == ["final"] * 3
    applied = [int(s["credits_applied"]) for s in statements]
    assert sum(applied) == 5000
    for s in statements:
        assert int(s["amount_due"]) == 3850 - int(s["credits_applied"])
    balance = ok(cli("credits", "balance", "--account", "acme"))
    assert balance["balance"] == "0"
    uses = [e for e in balance["ledger"] if e["kind"] == "use"]
    assert sum(-int(e["points"]) for e in uses) == 5000
    by_month: dict[str, int] = {}
    for e in uses:
        by_month[e["month"]] = by_month.get(e["month"], 0) - int(e["points"])
    assert by_month == {
        s["month"]: int(s["credits_applied"]) for s in statements if s["credits_applied"] != "0"
    }


def _ok(result: Any) -> dict[str, Any]:
    assert result.code == 0, result.stderr
    body = result.json()
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize(
    ("at", "october", "november_plan"),
    [
        (jst(2026, 10, 1), "3000", "standard-volume"),  # at the first instant: October too
        (jst(2026, 10, 1, 0, 0, 1), "3500", "standard-volume"),  # a second later: November
        (jst(2026, 10, 31, 23, 59, 59), "3500", "standard-volume"),
    ],
)
def test_a_month_is_priced_at_the_plan_in_force_at_its_first_instant(
    database_url: str, opener: Opener, at: datetime, october: str, november_plan: str
) -> None:
    worked_example(database_url)
    with opener() as conn, conn.transaction():
        result = change_plan(
            conn,
            CATALOG,
            get_account(conn, "acme"),
            "standard-volume",
            at=at,
            now=NOV,
            changed_by="test",
        )
    assert result.first_month == ("2026-10" if october == "3000" else "2026-11")
    statement = _october(opener)
    assert (statement.plan, statement.subtotal) == (
        "standard-volume" if october == "3000" else "standard",
        Decimal(october),
    )
    with opener() as conn:
        november = get_usage(conn, CATALOG, "acme", "2026-11", now=NOV)
        assert get_account(conn, "acme").plan == "standard-volume"  # at once for the service
    assert november.plan == november_plan


def test_plan_change_refusals(database_url: str, opener: Opener) -> None:
    worked_example(database_url)
    _october(opener)
    with opener() as conn:
        account = get_account(conn, "acme")
        for plan, at, error, field in [
            ("gold", NOV, InvalidError, "plan"),
            ("standard-volume", datetime(2027, 1, 1, tzinfo=UTC), InvalidError, "at"),
            # October is closed: a change at its first instant would reprice it.
            ("standard-volume", jst(2026, 10, 1), ConflictError, "at"),
            ("standard-volume", jst(2026, 8, 1), ConflictError, "at"),
        ]:
            with pytest.raises(error) as refused, conn.transaction():
                change_plan(conn, CATALOG, account, plan, at=at, now=NOV, changed_by="test")
            assert refused.value.field == field
        assert get_account(conn, "acme").plan == "standard"


@pytest.mark.parametrize(
    ("signed_up", "free_month"),
    [
        ("2026-10-31T23:59:59+09:00", "2026-10"),  # the last second of October in Tokyo
        ("2026-10-31T15:00:00Z", "2026-11"),  # = 1 November 00:00 in Tokyo
    ],
)
def test_the_sign_up_month_is_free_in_the_accounts_zone(
    cli: Cli, database_url: str, signed_up: str, free_month: str
) -> None:
    ok = _ok
    ok(cli("accounts", "create", "--ref", "new", "--name", "N", "--plan", "starter",
           "--country", "JP", "--tz", "Asia/Tokyo", "--signed-up", signed_up))  # fmt: skip
    _register(
        database_url, "new", [f"d{n}" for n in range(1, 6)], datetime.fromisoformat(signed_up)
    )
    free = ok(cli("statement", "--account", "new", "--month", free_month))
    assert free["subtotal"] == "0"
    assert [x["kind"] for x in free["lines"]] == ["usage", "usage", "discount"]
    # Moving to another plan keeps the sign-up month free: it is priced at its first plan.
    ok(cli("accounts", "set-plan", "--account", "new", "--plan", "standard"))
    again = ok(cli("statement", "--account", "new", "--month", free_month))
    assert (again["plan"], again["subtotal"]) == ("starter", "0")


@pytest.mark.parametrize(
    ("plan", "change", "billed", "corrected", "amount"),
    [
        ("standard", "raise", 12, 13, "250"),
        ("standard", "lower", 12, 11, "-250"),
        ("standard-volume", "raise", 12, 13, "250"),  # 13 x 250 - 12 x 250
        ("standard-volume", "lower2", 12, 10, "0"),  # 10 x 300 = 12 x 250: a line, no money
    ],
)
def test_a_late_event_for_a_closed_month_is_an_adjustment_on_the_next_statement(
    database_url: str,
    opener: Opener,
    plan: str,
    change: str,
    billed: int,
    corrected: int,
    amount: str,
) -> None:
    worked_example(database_url, plan=plan)
    october = _october(opener)
    assert october.peaks["lte-m"].peak == 12
    with opener() as conn, conn.transaction():
        if change == "raise":  # a device imported late, registered on 6 October
            register_device(
                conn, CATALOG, account_ref="acme", device_class="lte-m", device_id="late-1",
                at=jst(2026, 10, 6),
            )  # fmt: skip
        else:  # deactivations stored late, at the instant d9.. were registered
            for n in range(9, 11 if change == "lower2" else 10):
                set_device_state(
                    conn, device_id=f"acme-d{n}", state="inactive", at=jst(2026, 10, 5, 9),
                    source="import",
                )  # fmt: skip
    with opener() as conn:
        usage = get_usage(conn, CATALOG, "acme", "2026-10", now=NOV)
        again = get_statement(conn, CATALOG, "acme", "2026-10", now=NOV)
    # The closed month is unchanged; usage shows the billed peak and the corrected one.
    assert again == october
    assert usage.classes["lte-m"].peak == billed
    assert usage.corrected is not None
    assert usage.corrected["lte-m"].peak == corrected

    report = close_month(opener, CATALOG, "2026-11", now=DEC, account_ref="acme")
    assert report.closed == ["acme"]
    with opener() as conn:
        november = get_statement(conn, CATALOG, "acme", "2026-11", now=DEC)
    adjustments = [x for x in november.lines if x.kind == "adjustment"]
    assert [
        (x.corrects_month, x.device_class, x.billed_quantity, x.corrected_quantity, x.amount)
        for x in adjustments
    ] == [(date(2026, 10, 1), "lte-m", billed, corrected, Decimal(amount))]
    own = sum(x.amount for x in november.lines if x.kind != "adjustment")
    assert november.subtotal == own + Decimal(amount)
    assert november.tax == (november.subtotal * Decimal("0.10")).to_integral_value("ROUND_DOWN")

    # Nothing new: December has no adjustment. Another late event: adjusted from the
    # corrected quantity, not from the one first billed.
    with opener() as conn, conn.transaction():
        register_device(
            conn, CATALOG, account_ref="acme", device_class="lte-m", device_id="late-2",
            at=jst(2026, 10, 6),
        )  # fmt: skip
    close_month(opener, CATALOG, "2026-12", now=datetime(2027, 1, 5, tzinfo=UTC))
    with opener() as conn:
        december = get_statement(conn, CATALOG, "acme", "2026-12", now=DEC)
    late = [x for x in december.lines if x.kind == "adjustment"]
    assert [(x.corrects_month, x.billed_quantity, x.corrected_quantity) for x in late] == [
        (date(2026, 10, 1), corrected, corrected + 1),
        # late-2 was active in November too, which closed with one device fewer.
        (date(2026, 11, 1), november.peaks["lte-m"].peak, november.peaks["lte-m"].peak + 1),
    ]


def test_an_event_stored_while_a_close_commits_is_adjusted_before_and_after_the_sweep(
    database_url: str, owner_database_url: str, opener: Opener
) -> None:
    """The late-event trigger cannot see a statement that commits after the event's
    transaction looked: such an event is found among the events received around the close
    until ``sweep_racing`` notes it, and in late_events after; the adjustment is the same."""
    worked_example(database_url)
    _october(opener)
    # Stored as if its transaction had checked for closed months just before October's
    # statement committed: the trigger that notes late events does not fire.
    with connect(owner_database_url) as owner, owner.transaction():
        owner.execute("ALTER TABLE device_state_events DISABLE TRIGGER device_state_events_late")
        register_device(
            owner, CATALOG, account_ref="acme", device_class="lte-m", device_id="racer",
            at=jst(2026, 10, 6),
        )  # fmt: skip
        owner.execute("ALTER TABLE device_state_events ENABLE TRIGGER device_state_events_late")

    def adjustments() -> list[tuple[date | None, int | None, int | None]]:
        with opener() as conn:
            usage = get_usage(conn, CATALOG, "acme", "2026-11", now=NOV)
        assert usage.statement is not None
        return [
            (x.corrects_month, x.billed_quantity, x.corrected_quantity)
            for x in usage.statement.lines
            if x.kind == "adjustment"
        ]

    with opener() as conn:
        noted = conn.execute("SELECT count(*) AS n FROM late_events").fetchone()
    assert noted is not None
    assert noted["n"] == 0
    assert adjustments() == [(date(2026, 10, 1), 12, 13)]

    with opener() as conn:
        # Within the margin after the close nothing is swept: such events may still arrive.
        assert sweep_racing(conn) == (0, 0)
        later = datetime.now(UTC) + LATE_MARGIN + timedelta(minutes=1)
        # Every October event stored within the margin of the close is noted (here all of
        # them: the test stored them seconds before it); looking again is harmless.
        swept, events = sweep_racing(conn, now=later)
        assert sweep_racing(conn, now=later) == (0, 0)
        times = [r["event_time"] for r in conn.execute("SELECT event_time FROM late_events")]
    assert swept == 1
    assert events == len(times) > 1
    assert jst(2026, 10, 6) in times
    assert adjustments() == [(date(2026, 10, 1), 12, 13)]

    close_month(opener, CATALOG, "2026-11", now=DEC, account_ref="acme")
    with opener() as conn:
        november = get_statement(conn, CATALOG, "acme", "2026-11", now=DEC)
    late = [x for x in november.lines if x.kind == "adjustment"]
    assert [(x.corrects_month, x.billed_quantity, x.corrected_quantity) for x in late] == [
        (date(2026, 10, 1), 12, 13)
    ]
