"""The maintained usage figures (migration 0014) against the replay (metering.peak): the same
peaks and daily series on random timelines recorded in random order, late and same-instant
events included; and the incremental figures equal to a rebuild from the events."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmeter.db import connect
from metering import usage_model
from metering.daily import daily_usage
from metering.peak import Event, compute_peaks, month_bounds

Conn = psycopg.Connection[Any]
TZ = "Asia/Tokyo"
START, END = month_bounds("2026-10", TZ)
NOV_START, NOV_END = month_bounds("2026-11", TZ)
US = timedelta(microseconds=1)
DAY = timedelta(days=1)
# Few instants, so events collide: around both month boundaries, a local midnight, a quarter
# hour's edge and mid-month.
INSTANTS = [
    START - timedelta(days=40),
    START - US,
    START,
    START + US,
    START + DAY - US,
    START + DAY,
    START + timedelta(days=3, minutes=15) - US,
    START + timedelta(days=3, minutes=15),
    START + timedelta(days=17, hours=5),
    END - US,
    END,
    END + timedelta(days=1),
]
CLASS_OF = {"a1": "lte-m", "a2": "lte-m", "a3": "lte-m", "b1": "wifi", "b2": "wifi"}
_accounts = itertools.count(1)


def new_account(conn: Conn) -> int:
    """An account in TZ, so the trigger keeps its days (migration 0019) as for any account."""
    row = conn.execute(
        "INSERT INTO accounts (ref, name, plan, country, timezone, signed_up_on)"
        " VALUES (%s, 'usage model', 'standard', 'JP', %s, '2026-01-01') RETURNING id",
        (f"usage-model-{next(_accounts)}", TZ),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def class_of(device: str) -> str:
    """The hypothesis devices' class, or for fleets: every third device is wifi."""
    if device in CLASS_OF:
        return CLASS_OF[device]
    return "wifi" if device.startswith("x") and int(device[1:]) % 3 == 0 else "lte-m"


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with connect(database_url, autocommit=True) as c:
        yield c


Recorded = list[list[tuple[datetime, str, str]]]

one_event = st.tuples(
    st.sampled_from(INSTANTS),
    st.sampled_from(sorted(CLASS_OF)),
    st.sampled_from(["active", "inactive"]),
)
# Statements as recorded: most hold one event, some several (a batch of ingest).
recordings = st.lists(st.lists(one_event, min_size=1, max_size=4), max_size=14)


def record(conn: Conn, account_id: int, statements: Recorded) -> list[Event]:
    """Insert each statement's events in one INSERT, in order; returns them with their ids."""
    events: list[Event] = []
    for rows in statements:
        values = ", ".join(["(%s, %s, %s, %s, %s, 'import')"] * len(rows))
        params: list[Any] = []
        for at, device, state in rows:
            params += [at, device, account_id, class_of(device), state]
        got = conn.execute(
            "INSERT INTO device_state_events (time, device_id, account_id, device_class, state,"
            f" source) VALUES {values} RETURNING id, time, device_id, device_class, state",
            params,
        ).fetchall()
        events += [
            Event(r["time"].astimezone(UTC), r["device_id"], r["device_class"], r["state"], r["id"])
            for r in got
        ]
    return events


def figures(conn: Conn, account_id: int) -> list[tuple[Any, ...]]:
    """The buckets and the days kept from them, for comparing the trigger's with a rebuild."""
    rows = conn.execute(
        "SELECT device_class, bucket, max_count, max_at, count_after, last_at FROM usage_buckets"
        " WHERE account_id = %s ORDER BY device_class, bucket",
        (account_id,),
    ).fetchall()
    days = conn.execute(
        "SELECT 'day', device_class, day, max_count, max_at, count_after FROM usage_days"
        " WHERE account_id = %s ORDER BY device_class, day",
        (account_id,),
    ).fetchall()
    assert bool(days) == bool(rows)
    return [tuple(r.values()) for r in [*rows, *days]]


def without_evidence(peaks: dict[str, Any]) -> dict[str, tuple[int, datetime]]:
    return {c: (p.peak, p.peak_at) for c, p in peaks.items()}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(statements=recordings)
def test_maintained_figures_equal_the_replay(conn: Conn, statements: Recorded) -> None:
    account_id = new_account(conn)
    events = record(conn, account_id, statements)
    for start, end in ((START, END), (NOV_START, NOV_END), (START + DAY, START + 2 * DAY)):
        expected = without_evidence(compute_peaks(events, start, end))
        # In the account's zone from the days kept; in UTC by folding the buckets.
        for tz in (TZ, "UTC"):
            got = without_evidence(usage_model.month_peaks(conn, account_id, start, end, tz))
            assert got == expected, (start, tz, statements)
    expected_days = daily_usage(events, START, END, TZ)
    assert usage_model.daily(conn, account_id, START, END, TZ) == expected_days
    incremental = figures(conn, account_id)
    conn.execute("SELECT devmeter_usage_rebuild(%s)", (account_id,))
    assert figures(conn, account_id) == incremental


def test_a_late_event_moves_only_what_follows_it(conn: Conn) -> None:
    """Ten devices Active through October, then one recorded late as Inactive for a week: the
    peak before it stays, the count during it drops, and nothing after it moves."""
    account_id = new_account(conn)
    devices = [f"d{n}" for n in range(10)]
    record(conn, account_id, [[(START - DAY, d, "active")] for d in devices[:5]])
    record(conn, account_id, [[(START + timedelta(days=2), d, "active")] for d in devices[5:]])
    before = usage_model.month_peaks(conn, account_id, START, END)
    # Late: recorded after the others, a week earlier than the latest of them.
    record(
        conn, account_id, [[(START + DAY, "d1", "inactive")], [(START + 5 * DAY, "d1", "active")]]
    )
    after = usage_model.month_peaks(conn, account_id, START, END)
    assert before["lte-m"].peak == after["lte-m"].peak == 10
    days = {
        d.day.day: d.classes["lte-m"] for d in usage_model.daily(conn, account_id, START, END, TZ)
    }
    assert days[1] == (5, 5)
    assert days[2] == (4, 4)  # d1 Inactive from the 2nd's first instant (M3)
    assert days[3] == (9, 9)
    assert days[6] == (10, 10)


def test_rebuild_matches_on_a_shuffled_fleet(conn: Conn) -> None:
    account_id = new_account(conn)
    rng = random.Random(11)
    devices = [f"x{n}" for n in range(40)]
    rows = [
        (
            START + timedelta(minutes=rng.randrange(0, 60 * 24 * 40)),
            rng.choice(devices),
            rng.choice(["active", "inactive"]),
        )
        for _ in range(600)
    ]
    rng.shuffle(rows)
    events = record(conn, account_id, [rows[i : i + 7] for i in range(0, len(rows), 7)])
    for start, end in ((START, END), (NOV_START, NOV_END)):
        expected = without_evidence(compute_peaks(events, start, end))
        got = usage_model.month_peaks(conn, account_id, start, end, TZ)
        assert without_evidence(got) == expected
    incremental = figures(conn, account_id)
    conn.execute("SELECT devmeter_usage_rebuild(%s)", (account_id,))
    assert figures(conn, account_id) == incremental
