"""Month close, statements and the billing export against a real PostgreSQL (SPEC C1, C3, M5)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from devmeter.db import connect
from devmeter.errors import ConflictError, InvalidError, NotFoundError
from metering.catalog import load_catalog
from metering.export import export_month
from metering.registry import create_account, register_device, set_device_state
from metering.statements import (
    close_month,
    due_months,
    get_statement,
    get_usage,
    statement_document,
)

JST = ZoneInfo("Asia/Tokyo")
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
CATALOG = load_catalog()


def jst(*args: int) -> datetime:
    return datetime(*args, tzinfo=JST)  # type: ignore[misc]


def worked_example(url: str, ref: str = "acme", plan: str = "standard") -> None:
    """SPEC's worked example: October 2026 in Tokyo peaks at 12 lte-m devices."""
    with connect(url) as conn, conn.transaction():
        create_account(
            conn,
            CATALOG,
            ref=ref,
            name=ref.upper(),
            plan=plan,
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=date(2026, 9, 1),
        )

        def reg(n: int, at: datetime) -> None:
            register_device(
                conn,
                CATALOG,
                account_ref=ref,
                device_class="lte-m",
                device_id=f"{ref}-d{n}",
                at=at,
            )

        for n in range(1, 9):
            reg(n, jst(2026, 9, 30, 10))
        for n in range(9, 13):
            reg(n, jst(2026, 10, 5, 9))
        for n in range(1, 5):
            set_device_state(
                conn,
                device_id=f"{ref}-d{n}",
                state="inactive",
                at=jst(2026, 10, 10, 12),
                source="console",
            )
        for n in range(13, 17):
            reg(n, jst(2026, 10, 20, 8))
        set_device_state(
            conn,
            device_id=f"{ref}-d5",
            state="inactive",
            at=jst(2026, 10, 25, 18),
            source="heartbeat",
        )
        reg(17, jst(2026, 10, 31, 23, 59, 59))
        # Registered at 2026-11-01 01:00 JST: November's, not October's.
        reg(18, datetime(2026, 10, 31, 16, 0, tzinfo=UTC))


@pytest.fixture
def opener(database_url: str) -> Callable[[], psycopg.Connection[Any]]:
    return lambda: connect(database_url)


def test_worked_example_closes_to_3500(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    with opener() as conn:
        preliminary = get_statement(conn, CATALOG, "acme", "2026-10", now=NOW)
    assert preliminary.status == "preliminary"
    assert preliminary.subtotal == Decimal(3500)

    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert report.closed == ["acme"]
    assert not report.failed

    with opener() as conn:
        final = get_statement(conn, CATALOG, "acme", "2026-10", now=NOW)
        usage = get_usage(conn, CATALOG, "acme", "2026-10", now=NOW)
        november = get_usage(conn, CATALOG, "acme", "2026-11", now=NOW)
    assert final.status == usage.status == "final"
    assert final.closed_at is not None
    # P3: Japan's 10 % in force on 2026-10-01, on the subtotal (credit points: not yet).
    assert (final.subtotal, final.tax_rate, final.tax) == (3500, Decimal("0.10"), 350)
    assert (final.amount_due, final.currency) == (3850, "JPY")
    assert final.due_date == date(2026, 11, 30)
    assert [(x.quantity, x.unit_price, x.amount) for x in final.lines] == [
        (10, 300, 3000),
        (2, 250, 500),
    ]
    peak = usage.classes["lte-m"]
    assert peak.peak == 12
    assert peak.peak_at == jst(2026, 10, 5, 9)
    assert peak.device_ids == tuple(sorted(f"acme-d{n}" for n in range(1, 13)))
    assert final.peaks == usage.classes
    # November starts with 12 active (d6-d17) and d18 joins at 01:00 on the 1st.
    assert november.status == "preliminary"
    assert november.classes["lte-m"].peak == 13


def test_volume_plan_prices_the_same_peak_at_3000(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url, "vol", "standard-volume")
    close_month(opener, CATALOG, "2026-10", now=NOW)
    with opener() as conn:
        final = get_statement(conn, CATALOG, "vol", "2026-10", now=NOW)
    assert final.subtotal == Decimal(3000)
    assert [(x.quantity, x.unit_price) for x in final.lines] == [(12, 250)]


def test_distinct_plan_bills_every_device_active_in_the_month(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    # M6: the seats plan has the standard tiers but bills each device Active in October once.
    # Beside a peak-billed account in the same zone, so one close computes both metrics.
    worked_example(database_url)
    worked_example(database_url, "seat", "seats")
    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert sorted(report.closed) == ["acme", "seat"]
    assert not report.failed

    with opener() as conn:
        final = get_statement(conn, CATALOG, "seat", "2026-10", now=NOW)
        usage = get_usage(conn, CATALOG, "seat", "2026-10", now=NOW)
        november = get_usage(conn, CATALOG, "seat", "2026-11", now=NOW)
        peak_billed = get_statement(conn, CATALOG, "acme", "2026-10", now=NOW)
    # d1-d17 were all Active at some instant of October; d18 is November's.
    assert [(x.quantity, x.unit_price, x.amount) for x in final.lines] == [
        (10, 300, 3000),
        (7, 250, 1750),
    ]
    assert (final.subtotal, final.tax, final.amount_due) == (4750, 475, 5225)
    distinct = usage.classes["lte-m"]
    assert distinct.peak == 17
    # The count reached 17 when the last of them, d17, became Active.
    assert distinct.peak_at == jst(2026, 10, 31, 23, 59, 59)
    assert distinct.device_ids == tuple(sorted(f"seat-d{n}" for n in range(1, 18)))
    assert final.peaks == usage.classes
    assert usage.distinct == {"lte-m", "wifi", "gateway"}
    assert statement_document(final, evidence=True)["evidence"]["lte-m"] == list(
        distinct.device_ids
    )
    # d1-d5, set Inactive in October and still so, stop from November; d18 joins.
    assert november.classes["lte-m"].peak == 13
    assert november.classes["lte-m"].device_ids == tuple(sorted(f"seat-d{n}" for n in range(6, 19)))
    # The peak-billed account closed in the same run is untouched by its neighbour's metric.
    assert peak_billed.subtotal == 3500


def test_closing_twice_or_concurrently_gives_one_statement(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    worked_example(database_url, "beta")
    reports = []
    barrier = threading.Barrier(4)

    def closer() -> None:
        barrier.wait()
        reports.append(close_month(opener, CATALOG, "2026-10", now=NOW))

    threads = [threading.Thread(target=closer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(reports) == 4
    closed = sorted(ref for r in reports for ref in r.closed)
    assert closed == ["acme", "beta"]
    assert all(not r.failed for r in reports)
    again = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert again.closed == []
    assert again.already_closed == ["acme", "beta"]
    with opener() as conn:
        rows = conn.execute("SELECT count(*) AS n FROM statements").fetchone()
    assert rows is not None
    assert rows["n"] == 2


def test_a_final_statement_never_changes(
    database_url: str, owner_database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    close_month(opener, CATALOG, "2026-10", now=NOW)
    # The service role holds no such privilege (tests/integration/test_service_role.py); the
    # triggers refuse it to the owner too.
    for sql in (
        "UPDATE statements SET subtotal = 1",
        "DELETE FROM statement_lines",
        "UPDATE statement_peaks SET peak = 1",
        "TRUNCATE statements CASCADE",
        "TRUNCATE statement_lines",
        "TRUNCATE statement_peaks",
    ):
        with (
            psycopg.connect(owner_database_url) as conn,
            pytest.raises(psycopg.errors.RestrictViolation),
        ):
            conn.execute(sql)
    # A late event for October is stored but does not touch the final statement (C2).
    with opener() as conn, conn.transaction():
        set_device_state(
            conn, device_id="acme-d1", state="active", at=jst(2026, 10, 6, 0), source="api"
        )
    with opener() as conn:
        assert get_statement(conn, CATALOG, "acme", "2026-10", now=NOW).subtotal == 3500


def test_a_device_keeps_its_id_account_and_class(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    worked_example(database_url, "beta")
    for change in (
        "device_class = 'wifi'",
        "account_id = (SELECT id FROM accounts WHERE ref = 'beta')",
        "id = 'acme-renamed'",
    ):
        with opener() as conn, pytest.raises(psycopg.errors.RestrictViolation, match="never"):
            conn.execute(f"UPDATE devices SET {change} WHERE id = 'acme-d1'")
    with opener() as conn:
        # The rest of the row moves as before; setting a column to its own value is no change.
        conn.execute(
            "UPDATE devices SET name = 'pump', device_class = 'lte-m' WHERE id = 'acme-d1'"
        )
        row = conn.execute("SELECT name, device_class FROM devices WHERE id = 'acme-d1'").fetchone()
    assert row == {"name": "pump", "device_class": "lte-m"}


def test_month_not_over_yet_is_not_closed(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    just_after = jst(2026, 11, 1, 1)  # inside the 2-hour grace
    with pytest.raises(ConflictError, match="cannot be closed before 2026-10-31T17:00:00"):
        close_month(opener, CATALOG, "2026-10", now=just_after, account_ref="acme")
    report = close_month(opener, CATALOG, "2026-10", now=just_after)
    assert report.not_due == ["acme"]
    report = close_month(opener, CATALOG, "2026-10", now=jst(2026, 11, 1, 2))
    assert report.closed == ["acme"]


def test_one_failing_account_does_not_stop_the_others(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url, "aaa")
    worked_example(database_url, "bbb")
    worked_example(database_url, "ccc")
    # October is priced at the plan in force when it began (P6): a plan the catalog lacks.
    change = (
        "INSERT INTO plan_changes (account_id, plan, effective_at, changed_by)"
        " SELECT id, %s, '2026-09-30T15:00Z', 'test' FROM accounts WHERE ref = 'bbb'"
    )
    with opener() as conn:
        conn.execute(change, ("retired-plan",))
    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert report.closed == ["aaa", "ccc"]
    assert list(report.failed) == ["bbb"]
    assert "retired-plan" in report.failed["bbb"]
    with opener() as conn:
        failure = conn.execute("SELECT attempts, last_error FROM close_failures").fetchone()
        assert due_months(conn, now=NOW)[1:] == [("2026-10", ["bbb"])]
    assert failure is not None
    assert failure["attempts"] == 1

    with opener() as conn:
        conn.execute(change, ("standard",))
    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert report.closed == ["bbb"]
    with opener() as conn:
        left = conn.execute("SELECT count(*) AS n FROM close_failures").fetchone()
        assert [month for month, _ in due_months(conn, now=NOW)] == ["2026-09"]
    assert left is not None
    assert left["n"] == 0


def test_an_account_the_database_refuses_fails_alone(
    database_url: str, owner_database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    """Statements are inserted in batches; a batch the database refuses is retried one account
    at a time, so only the refused account fails, and it is recorded for the retry."""
    for ref in ("aaa", "bbb", "ccc"):
        worked_example(database_url, ref)
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION refuse_bbb() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.account_id = (SELECT id FROM accounts WHERE ref = 'bbb') THEN
                    RAISE EXCEPTION 'statement of bbb refused by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_bbb BEFORE INSERT ON statements
                FOR EACH ROW EXECUTE FUNCTION refuse_bbb();
            """
        )
    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert report.closed == ["aaa", "ccc"]
    assert list(report.failed) == ["bbb"]
    assert "refused by the test" in report.failed["bbb"]
    with opener() as conn:
        stored = conn.execute(
            "SELECT a.ref, s.subtotal, (SELECT count(*) FROM statement_lines l"
            " WHERE l.statement_id = s.id) AS lines FROM statements s"
            " JOIN accounts a ON a.id = s.account_id ORDER BY a.ref"
        ).fetchall()
        failures = conn.execute(
            "SELECT a.ref FROM close_failures f JOIN accounts a ON a.id = f.account_id"
        ).fetchall()
    # Each closed account's statement is whole: none of the failed batch's rows were kept.
    assert [(r["ref"], r["subtotal"], r["lines"]) for r in stored] == [
        ("aaa", Decimal(3500), 2),
        ("ccc", Decimal(3500), 2),
    ]
    assert [r["ref"] for r in failures] == ["bbb"]


def test_a_failing_peak_computation_fails_its_accounts_not_the_close(
    database_url: str,
    opener: Callable[[], psycopg.Connection[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worked_example(database_url, "aaa")
    worked_example(database_url, "bbb")

    def broken(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("2 devices at a peak of 3")

    monkeypatch.setattr("metering.statements.close_peaks", broken)
    report = close_month(opener, CATALOG, "2026-10", now=NOW)
    assert report.closed == []
    assert sorted(report.failed) == ["aaa", "bbb"]
    assert "2 devices at a peak of 3" in report.failed["aaa"]
    with opener() as conn:
        assert [month for month, _ in due_months(conn, now=NOW)[1:]] == ["2026-10"]
        failures = conn.execute("SELECT count(*) AS n FROM close_failures").fetchone()
    assert failures == {"n": 2}


def test_due_months_catch_up_from_sign_up(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url)
    with opener() as conn:
        assert due_months(conn, now=NOW) == [("2026-09", ["acme"]), ("2026-10", ["acme"])]
        assert due_months(conn, now=jst(2026, 10, 1, 1, 59)) == []
        assert due_months(conn, now=jst(2026, 10, 1, 2)) == [("2026-09", ["acme"])]


def test_future_month_and_bad_month_are_refused(database_url: str) -> None:
    worked_example(database_url)
    with connect(database_url) as conn:
        with pytest.raises(InvalidError, match="has not started yet"):
            get_usage(conn, CATALOG, "acme", "2026-12", now=NOW)
        with pytest.raises(InvalidError, match="YYYY-MM"):
            get_usage(conn, CATALOG, "acme", "2026/10", now=NOW)
        with pytest.raises(NotFoundError):
            get_usage(conn, CATALOG, "nobody", "2026-10", now=NOW)


def test_export_is_byte_stable_with_checksum(
    database_url: str, opener: Callable[[], psycopg.Connection[Any]]
) -> None:
    worked_example(database_url, "acme")
    worked_example(database_url, "zeta", "standard-volume")
    with opener() as conn, pytest.raises(NotFoundError, match="close the month first"):
        export_month(conn, "2026-10", "csv")
    close_month(opener, CATALOG, "2026-10", now=NOW)
    with opener() as conn:
        first = export_month(conn, "2026-10", "csv")
        second = export_month(conn, "2026-10", "csv")
        jsonl = export_month(conn, "2026-10", "jsonl")
    assert first.body == second.body
    assert first.export_id == jsonl.export_id
    assert first.export_id.startswith("dmx-2026-10-")
    import hashlib

    assert first.sha256 == hashlib.sha256(first.body).hexdigest()
    lines = first.body.decode().splitlines()
    assert lines[0].startswith("export_id,account,month,currency,line_no,kind,device_class")
    assert len(lines) == 1 + 3
    assert lines[1].split(",")[1:12] == [
        "acme",
        "2026-10",
        "JPY",
        "1",
        "usage",
        "lte-m",
        "lte-m 1\u201310 \u00d7 300",
        "10",
        "300",
        "3000",
        "3500",
    ]
    assert first.rows == 3
    assert first.statements == 2
    assert jsonl.body.count(b"\n") == 3
    assert b'"amount_due":"3300"' in jsonl.body  # 3,000 volume-priced + 10 % tax
