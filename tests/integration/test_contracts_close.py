"""Contracts around the month close (issue 12): a month under a contract bills the peak above
its committed devices and no base fee; charges are taxed one by one (P3) and paid by credit
points (P4); the scheduler's job issues them once."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from devmeter.config import Settings
from devmeter.db import connect
from metering import contracts, credits, webhook
from metering.catalog import Catalog, parse_catalog
from metering.export import export_month
from metering.registry import create_account, get_account, register_device
from metering.scheduler import build_scheduler, charge_outbox, issue_due
from metering.statements import close_month, get_statement, get_usage
from metering.webhook import deliver_due, enqueue_charge, verify
from tests.integration.conftest import Receiver
from tests.integration.test_contracts_cli import CATALOG as CATALOG_TOML
from tests.integration.test_ingest_worker import count, poll
from tests.integration.test_webhook import SECRET

Opener = Callable[[], psycopg.Connection[Any]]
CATALOG: Catalog = parse_catalog(tomllib.loads(CATALOG_TOML), "contracts.toml")
JST = ZoneInfo("Asia/Tokyo")


def jst(*args: int) -> datetime:
    return datetime(*args, tzinfo=JST)  # type: ignore[misc]


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def opener(database_url: str) -> Opener:
    return lambda: connect(database_url)


def fleet(opener: Opener, plan: str, signed_up: date, devices: int, at: datetime) -> None:
    with opener() as conn, conn.transaction():
        create_account(
            conn,
            CATALOG,
            ref="acme",
            name="ACME",
            plan=plan,
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=signed_up,
        )
        for n in range(1, devices + 1):
            register_device(
                conn, CATALOG, account_ref="acme", device_class="lte-m", device_id=f"d{n}", at=at
            )


def start(opener: Opener, term: str, at: datetime, **commit: int) -> dict[str, Any]:
    with opener() as conn, conn.transaction():
        return contracts.start(
            conn,
            CATALOG,
            get_account(conn, "acme"),
            term=term,
            commitments={k.replace("_", "-"): v for k, v in commit.items()},
            at=at,
            now=now(),
            requested_by="test",
        )


def close(opener: Opener, month: str) -> list[tuple[str, str | None, int, str]]:
    report = close_month(opener, CATALOG, month, now=now(), account_ref="acme")
    assert report.closed == ["acme"], report
    with opener() as conn:
        statement = get_statement(conn, CATALOG, "acme", month, now=now())
    return [(x.kind, x.device_class, x.quantity, str(x.amount)) for x in statement.lines]


def test_a_calendar_month_bills_the_peak_above_the_commitment(opener: Opener) -> None:
    fleet(opener, "cal", date(2017, 9, 1), 12, jst(2017, 9, 20))
    start(opener, "annual", jst(2017, 9, 15), lte_m=10)
    # September is the free period: no term, nothing committed, no base fee; usage as ever.
    assert close(opener, "2017-09") == [
        ("usage", "lte-m", 10, "1000"),
        ("usage", "lte-m", 2, "160"),
    ]
    # October: the first term's 10 devices are paid for; the 11th and 12th are overage, at the
    # tier they fall in (80 above 10).
    assert close(opener, "2017-10") == [("overage", "lte-m", 2, "160")]
    with opener() as conn, conn.transaction():
        contracts.change(
            conn,
            CATALOG,
            get_account(conn, "acme"),
            plan=None,
            commitments={"lte-m": 12},
            at=jst(2017, 11, 20),
            now=now(),
            requested_by="test",
        )
    # November's commitment is October's: the increase is paid from 1 December.
    assert close(opener, "2017-11") == [("overage", "lte-m", 2, "160")]
    assert close(opener, "2017-12") == []
    with opener() as conn:
        usage = get_usage(conn, CATALOG, "acme", "2018-01", now=now())
    assert usage.statement is not None
    assert usage.statement.subtotal == Decimal(0)


def test_an_anniversary_month_counts_the_largest_commitment_paid_in_it(opener: Opener) -> None:
    fleet(opener, "ann", date(2020, 10, 1), 8, jst(2020, 10, 1))
    start(opener, "monthly", jst(2020, 10, 13), lte_m=5)
    # Paid for from 13 October: October bills 3 above 5, and no base fee.
    assert close(opener, "2020-10") == [("overage", "lte-m", 3, "300")]


def test_charges_are_taxed_one_by_one_and_paid_by_credit_points(opener: Opener) -> None:
    fleet(opener, "cal", date(2019, 8, 1), 0, jst(2019, 8, 1))
    with opener() as conn, conn.transaction():
        credits.grant(
            conn,
            get_account(conn, "acme"),
            points=1500,
            reason="test",
            expires_on=None,
            at=now(),
            now=now(),
        )
    start(opener, "monthly", jst(2019, 8, 10))
    report = contracts.issue(opener, CATALOG, until=jst(2019, 11, 1), now=now())
    issued = [
        (c["issued_on"], c["tax_rate"], c["tax"], c["credits_applied"], c["amount_due"])
        for c in report.issued
    ]
    assert issued == [
        # September's term starts before the rate change: 8 %; October's after it: 10 %.
        (date(2019, 9, 1), "0.08", "80", "1080", "0"),
        (date(2019, 10, 1), "0.10", "100", "420", "680"),
        (date(2019, 11, 1), "0.10", "100", "0", "1100"),
    ]
    with opener() as conn:
        balance = credits.balance(conn, get_account(conn, "acme"), "JPY", now=now())
    assert balance.points == 0
    assert [(e.kind, e.points) for e in balance.ledger] == [
        ("grant", 1500),
        ("use", -1080),
        ("use", -420),
    ]
    # Issued once: a second run finds nothing due.
    assert contracts.issue(opener, CATALOG, until=jst(2019, 11, 1), now=now()).issued == []


def test_the_scheduler_issues_charges_on_its_own_and_two_issue_once(
    opener: Opener, database_url: str
) -> None:
    fleet(opener, "ann", date(2020, 10, 1), 0, jst(2020, 10, 1))
    with opener() as conn, conn.transaction():
        # Started without issuing (as if the instant were still to come): the job issues it.
        conn.execute(
            "INSERT INTO contracts (account_id, policy, currency, timezone, started_at)"
            " SELECT id, 'anniversary', 'JPY', 'Asia/Tokyo', %s FROM accounts",
            (jst(2020, 10, 13),),
        )
        conn.execute(
            "INSERT INTO contract_changes (contract_id, kind, requested_at, effect, term, plan,"
            " commitments, requested_by) SELECT id, 'start', started_at, 'now', 'annual', 'ann',"
            " '{}', 'test' FROM contracts"
        )
    assert issue_due(opener, CATALOG, now=jst(2021, 10, 13)) == 2
    assert issue_due(opener, CATALOG, now=jst(2021, 10, 13)) == 0
    config = Settings(scheduler_interval_s=1)
    scheduler = build_scheduler(config, CATALOG, database_url)
    scheduler.start()
    try:
        # The annual terms from 2020 to now (2022's at least), each once.
        poll(
            lambda: count(database_url, "SELECT count(*) FROM charges") >= 3,
            30,
            "the scheduler to renew the annual terms",
        )
    finally:
        scheduler.shutdown(wait=True)
    assert count(database_url, "SELECT count(DISTINCT key) - count(*) FROM charges") == 0


def test_charges_go_to_the_webhook_and_into_the_months_export(
    opener: Opener, receiver: Receiver
) -> None:
    fleet(opener, "ann", date(2020, 10, 1), 3, jst(2020, 10, 1))
    start(opener, "monthly", jst(2020, 10, 13))
    hook = charge_outbox(receiver.url)
    report = contracts.issue(opener, CATALOG, until=jst(2020, 11, 13), now=now(), on_issued=hook)
    assert [c["issued_on"] for c in report.issued] == [date(2020, 11, 13)]
    # The start's own charge was issued without the hook: queue it as its issuer would have.
    with opener() as conn, conn.transaction():
        enqueue_charge(conn, int(report.issued[0]["id"]) - 1, receiver.url)
    sent = deliver_due(opener, secret=SECRET, now=lambda: now() + timedelta(seconds=5), timeout_s=5)
    assert sent.delivered == 2
    bodies = sorted(
        ((json.loads(r.body), r.headers) for r in receiver.requests),
        key=lambda sent: int(sent[0]["charge_id"]),
    )
    keys = {headers["Idempotency-Key"] for _, headers in bodies}
    ids = {body["charge_id"] for body, _ in bodies}
    assert keys == {f"dmcharge-acme-{n}" for n in ids}
    for body, headers in bodies:
        assert verify(
            SECRET,
            headers["X-Devmeter-Signature"],
            json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n",
            now=int(now().timestamp()),
        )
        assert (body["kind"], body["amount"], body["tax"]) == ("term_fee", "1000", "100")
    with opener() as conn:
        listed = webhook.list_deliveries(conn, account_ref="acme", month="2020-11")
    assert [(d.status, d.charge, d.month) for d in listed] == [
        ("delivered", report.issued[0]["id"], "2020-11")
    ]

    # The months' exports: November has the account's statement, then its charge.
    for month in ("2020-10", "2020-11"):
        close_month(opener, CATALOG, month, now=now(), account_ref="acme")
    with opener() as conn:
        november = export_month(conn, "2020-11", "jsonl")
        csv = export_month(conn, "2020-11", "csv")
    rows = [json.loads(line) for line in november.body.splitlines()]
    assert november.layout == csv.layout == 3
    assert [(r["kind"], r["charge_id"] is not None) for r in rows] == [
        ("usage", False),
        ("term_fee", True),
    ]
    assert (rows[1]["period_start"], rows[1]["period_end"], rows[1]["due_date"]) == (
        "2020-11-13",
        "2020-12-12",
        "2020-11-13",
    )
    assert (
        csv.body.decode()
        .splitlines()[0]
        .endswith(",charge_id,contract,period_start,period_end,issued_at")
    )
    # A month with no charge issued (December's is not, yet) keeps the v2 layout.
    other = ok_month(opener, "2020-12")
    assert other.layout == 2


def ok_month(opener: Opener, month: str) -> Any:
    close_month(opener, CATALOG, month, now=now(), account_ref="acme")
    with opener() as conn:
        return export_month(conn, month, "jsonl")


def test_a_late_device_in_a_contract_month_is_adjusted_above_the_commitment(
    opener: Opener,
) -> None:
    fleet(opener, "cal", date(2017, 9, 1), 12, jst(2017, 9, 20))
    start(opener, "annual", jst(2017, 9, 15), lte_m=15)
    assert close(opener, "2017-10") == []  # 12 devices, 15 committed: nothing above
    with opener() as conn, conn.transaction():
        register_device(
            conn, CATALOG, account_ref="acme", device_class="lte-m", device_id="late",
            at=jst(2017, 10, 6),
        )  # fmt: skip
    # October corrected to 13: still within the commitment, an adjustment of nothing; November
    # bills nothing above 15 either.
    november = close(opener, "2017-11")
    assert november == [("adjustment", "lte-m", 1, "0")]
