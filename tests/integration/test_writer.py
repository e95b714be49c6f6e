"""The ingest writer against a real PostgreSQL: storage, dedup, derived state events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from devmeter.db import connect
from ingest.processor import Heartbeat, Reason, Rejection, State, device_topic, process
from ingest.writer import load_directory, write_batch
from metering.registry import set_device_state
from tests.conftest import seed_fleet
from tests.integration.test_ingest_worker import poll

T0 = datetime(2026, 10, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[dict[str, object]]]:
    seed_fleet(
        database_url,
        [("d1", "lte-m", None), ("g1", "gateway", None), ("c1", "wifi", "g1")],
        T0,
        signed_up_on=date(2026, 9, 1),
    )
    with connect(database_url) as c:
        yield c


def hb(
    device: str, minutes: int, state: State, seq: int = 1, reporter: str | None = None
) -> Heartbeat:
    cls = {"d1": "lte-m", "g1": "gateway", "c1": "wifi"}[device]
    return Heartbeat(
        T0 + timedelta(minutes=minutes),
        device,
        1,
        cls,
        state,
        seq,
        reporter or device,
        T0 + timedelta(minutes=minutes, seconds=1),
    )


def timeline(
    conn: psycopg.Connection[dict[str, object]], device: str
) -> list[tuple[int, str, str]]:
    rows = conn.execute(
        "SELECT time, state, source FROM device_state_events WHERE device_id = %s "
        "ORDER BY time, id",
        (device,),
    ).fetchall()
    return [
        (int((r["time"] - T0).total_seconds() // 60), str(r["state"]), str(r["source"]))  # type: ignore[operator]
        for r in rows
    ]


def current(
    conn: psycopg.Connection[dict[str, object]], device: str
) -> tuple[str, int, int | None]:
    row = conn.execute(
        "SELECT state, state_at, last_seen_at FROM devices WHERE id = %s", (device,)
    ).fetchone()
    assert row is not None
    seen = row["last_seen_at"]
    return (
        str(row["state"]),
        int((row["state_at"] - T0).total_seconds() // 60),  # type: ignore[operator]
        None if seen is None else int((seen - T0).total_seconds() // 60),
    )  # type: ignore[operator]


def test_only_state_changes_become_events(conn: psycopg.Connection[dict[str, object]]) -> None:
    result = write_batch(
        conn,
        [
            hb("d1", 1, "active"),
            hb("d1", 2, "inactive", 2),
            hb("d1", 3, "inactive", 3),
            hb("d1", 4, "active", 4),
        ],
        [],
    )
    assert (result.heartbeats, result.duplicates, result.events) == (4, 0, 2)
    assert timeline(conn, "d1") == [
        (0, "active", "registration"),
        (2, "inactive", "heartbeat"),
        (4, "active", "heartbeat"),
    ]
    assert current(conn, "d1") == ("active", 4, 4)


def test_redelivered_heartbeats_are_stored_once(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    batch = [hb("d1", 5, "inactive", 7)]
    first = write_batch(conn, batch, [])
    again = write_batch(conn, batch + batch, [])
    assert (first.heartbeats, first.events) == (1, 1)
    assert (again.heartbeats, again.duplicates, again.events) == (0, 2, 0)
    count = conn.execute("SELECT count(*) AS n FROM heartbeats").fetchone()
    assert count == {"n": 1}
    assert timeline(conn, "d1") == [(0, "active", "registration"), (5, "inactive", "heartbeat")]


def test_gateway_reported_child_is_a_gateway_event(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    write_batch(conn, [hb("g1", 1, "active"), hb("c1", 1, "inactive", reporter="g1")], [])
    assert timeline(conn, "c1") == [(0, "active", "registration"), (1, "inactive", "gateway")]
    assert timeline(conn, "g1") == [(0, "active", "registration")]


def test_late_heartbeat_changes_history_but_not_current_state(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    write_batch(conn, [hb("d1", 10, "active", 10), hb("d1", 20, "inactive", 20)], [])
    # Arrives last, dated between: the device was inactive from minute 15 ...
    write_batch(conn, [hb("d1", 15, "inactive", 15)], [])
    assert timeline(conn, "d1") == [
        (0, "active", "registration"),
        (15, "inactive", "heartbeat"),
        (20, "inactive", "heartbeat"),
    ]
    assert current(conn, "d1") == ("inactive", 20, 20)


def test_late_heartbeat_does_not_outlive_the_next_heartbeat(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    write_batch(conn, [hb("d1", 10, "active", 10), hb("d1", 30, "inactive", 30)], [])
    write_batch(conn, [hb("d1", 5, "inactive", 5)], [])
    # Inactive at 5, but the heartbeat at 10 said active again: that must be on the timeline.
    assert timeline(conn, "d1") == [
        (0, "active", "registration"),
        (5, "inactive", "heartbeat"),
        (10, "active", "heartbeat"),
        (30, "inactive", "heartbeat"),
    ]


def test_console_event_then_older_heartbeat_keeps_console_state(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    with conn.transaction():
        set_device_state(
            conn, device_id="d1", state="inactive", at=T0 + timedelta(minutes=50), source="console"
        )
    write_batch(conn, [hb("d1", 40, "active", 40)], [])
    assert current(conn, "d1") == ("inactive", 50, 40)


def test_a_repeated_deactivate_records_nothing_and_a_heartbeat_before_it_stands(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    write_batch(conn, [hb("d1", 10, "inactive", 1)], [])
    with conn.transaction():
        # Already inactive: changes nothing and, since issue 9, records nothing (one event per
        # change, as the API documents).
        device = set_device_state(
            conn, device_id="d1", state="inactive", at=T0 + timedelta(minutes=20), source="api"
        )
    assert (device.state, device.state_since) == ("inactive", T0 + timedelta(minutes=10))
    write_batch(conn, [hb("c1", 15, "active", 2, reporter="g1"), hb("d1", 15, "active", 2)], [])
    # The trade-off (set_device_state's docstring): the device's own report, dated after its
    # latest event, stands; the repeat, not on the timeline, does not overrule it.
    assert timeline(conn, "d1")[-2:] == [
        (10, "inactive", "heartbeat"),
        (15, "active", "heartbeat"),
    ]
    assert current(conn, "d1")[:2] == ("active", 15)


def test_state_since_is_the_last_change_not_the_latest_heartbeat(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    def since(device_id: str) -> datetime:
        row = conn.execute("SELECT state_since FROM devices WHERE id = %s", (device_id,)).fetchone()
        assert row is not None
        value = row["state_since"]
        assert isinstance(value, datetime)
        return value

    registered = since("d1")
    write_batch(conn, [hb("d1", 10, "active", 1), hb("d1", 20, "active", 2)], [])
    assert since("d1") == registered, "Active heartbeats of an Active device change nothing"
    write_batch(conn, [hb("d1", 30, "inactive", 3)], [])
    assert since("d1") == T0 + timedelta(minutes=30)
    write_batch(conn, [hb("d1", 40, "inactive", 4)], [])
    assert since("d1") == T0 + timedelta(minutes=30)
    with conn.transaction():
        set_device_state(
            conn, device_id="d1", state="active", at=T0 + timedelta(minutes=50), source="api"
        )
    assert since("d1") == T0 + timedelta(minutes=50)
    # A late heartbeat, older than the latest event, does not move the current state or its start.
    write_batch(conn, [hb("d1", 45, "inactive", 5)], [])
    assert since("d1") == T0 + timedelta(minutes=50)


def test_an_action_dated_before_an_unrecorded_heartbeat_moves_after_it(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    # An in-order Active heartbeat of an Active device records no event, only moves the row.
    write_batch(conn, [hb("d1", 13, "active", 1)], [])
    assert timeline(conn, "d1") == [(0, "active", "registration")]
    with conn.transaction():
        device = set_device_state(
            conn, device_id="d1", state="inactive", at=T0 + timedelta(minutes=10), source="api"
        )
    # Dated at 10, it would say Inactive from 10 while the device said Active at 13.
    assert (device.state, device.state_at) == ("inactive", T0 + timedelta(minutes=13))
    assert timeline(conn, "d1") == [(0, "active", "registration"), (13, "inactive", "api")]
    assert current(conn, "d1") == ("inactive", 13, 13)


def test_two_late_reports_of_one_instant_share_one_successor(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    write_batch(conn, [hb("c1", 10, "active", 1), hb("c1", 20, "active", 2)], [])
    # Late: the device and its gateway both say it was Inactive at minute 5.
    write_batch(conn, [hb("c1", 5, "inactive", 3), hb("c1", 5, "inactive", 4, reporter="g1")], [])
    successors = [e for e in timeline(conn, "c1") if e[0] == 10]
    assert successors == [(10, "active", "heartbeat")]


def test_rejections_are_quarantined(conn: psycopg.Connection[dict[str, object]]) -> None:
    rejection = Rejection(
        Reason.SCHEMA,
        "Object missing required field `seq`",
        device_topic("acme", "d1"),
        b'{"state":"active"}',
        T0,
    )
    result = write_batch(conn, [], [rejection])
    assert result.rejections == 1
    row = conn.execute("SELECT topic, reason, detail, payload FROM rejected_heartbeats").fetchone()
    assert row == {
        "topic": device_topic("acme", "d1"),
        "reason": "schema",
        "detail": "Object missing required field `seq`",
        "payload": b'{"state":"active"}',
    }


def test_hostile_payloads_are_quarantined_not_fatal(
    conn: psycopg.Connection[dict[str, object]],
) -> None:
    """Each of these once stopped the worker: an exception out of the processor, or a detail
    PostgreSQL refuses to store (NUL), which failed every retry of the batch."""
    directory = load_directory(conn)
    payloads = [
        b'{"state":"\xff","ts":1,"seq":2}',
        b'{"state":"active","ts":"9999-12-31T23:59:59-01:00","seq":1}',
        b'{"state":"active","ts":"2026-10-01T00:00:00Z","seq":1,"\\u0000":0}',
    ]
    rejections = []
    for payload in payloads:
        result = process(device_topic("acme", "d1"), payload, T0 + timedelta(minutes=1), directory)
        assert isinstance(result, Rejection), payload
        rejections.append(result)
    assert write_batch(conn, [], rejections).rejections == 3
    rows = conn.execute("SELECT reason, detail, payload FROM rejected_heartbeats ORDER BY id")
    stored = rows.fetchall()
    assert [r["reason"] for r in stored] == ["malformed_json", "schema", "schema"]
    assert [r["payload"] for r in stored] == payloads
    assert "unknown field `\\x00`" in str(stored[2]["detail"])


def test_directory_lists_devices_with_binding(conn: psycopg.Connection[dict[str, object]]) -> None:
    directory = load_directory(conn)
    assert set(directory) == {("acme", "d1"), ("acme", "g1"), ("acme", "c1")}
    assert directory["acme", "c1"].gateway_id == "g1"
    assert directory["acme", "d1"].registered_at == T0


def test_devices_heard_from_in_every_batch_are_updated_in_place(database_url: str) -> None:
    """Each batch moves the last-seen time of every device it heard from. With room left on
    each page (fillfactor 70) most of those updates are HOT: no new index entries, and the
    space of old versions reused without vacuum. Measured over these 30 batches: 96-100 % HOT
    at fillfactor 70 on a quiet server, 43 % at the default of 100. Under the suite's load it
    fell to 52 % once: pruning waits for the server-wide oldest snapshot, which other tests'
    transactions hold back. So the bound is what load cannot take away: an index on a column
    every batch writes (last_seen_at, state) would make every update non-HOT (0 %)."""
    devices = [f"h{n:03}" for n in range(400)]
    seed_fleet(database_url, [(d, "lte-m", None) for d in devices], T0)
    with connect(database_url, autocommit=True) as conn:
        options = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'devices'")
        assert options.fetchone() == {"reloptions": ["fillfactor=70"]}
        # Packed as a bulk registration or a restore leaves them: no slack from the seeding.
        conn.execute("VACUUM FULL devices")
        row = conn.execute("SELECT id FROM accounts WHERE ref = 'acme'").fetchone()
        assert row is not None
        account_id = int(str(row["id"]))

    # A backend reports its table statistics when it exits (else up to 10 s after going idle).
    with connect(database_url) as conn:
        for n in range(1, 31):
            at = T0 + timedelta(minutes=n)
            heartbeats = [
                Heartbeat(at, d, account_id, "lte-m", "active", n, d, at) for d in devices
            ]
            write_batch(conn, heartbeats, [])

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as watcher:

        def read() -> dict[str, Any]:
            watcher.execute("SELECT pg_stat_clear_snapshot()")
            found = watcher.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'devices'"
            ).fetchone()
            assert found is not None
            return found

        poll(lambda: read()["n_tup_upd"] >= 30 * len(devices), 10, "table statistics")
        stats = read()
    assert stats["n_tup_hot_upd"] >= 0.3 * stats["n_tup_upd"], stats
