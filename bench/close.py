"""Month-close benchmark (issue 4): close a month of state events for every account.

    ./dev bench close [--accounts 1000 --devices 100000 --events 1000000 --month 2026-10
                       --scale 1,2 --naive-sample 2000 --json FILE]

For each scale it builds a scratch database on DEVMETER_BENCH_DATABASE_URL (an embedded
PostgreSQL if that is unreachable), generates the accounts, devices and ``events x scale``
state events in SQL, and times in that same database: a bare ``count(*)`` over the month's
events (the floor any close must pay), ``metering.statements.close_month`` for all accounts
(what the scheduler runs), and a naive per-device Python loop (the baseline a close must beat).
Every scale gets the same accounts and devices (one seed), so the scales differ only in how many
events there are. Scratch databases are dropped at the end, also on Ctrl-C or SIGTERM.

Progress goes to stderr; the table of figures, ratios and targets to stdout. When a target is
missed the run also shows where the close spends its time: once per run, a cProfile of the
close. Each scale also times the events' COPY out of PostgreSQL alone, unprocessed: the floor of
the peak computation's design (metering.peak_frame), as the bare count is the floor of any.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import random
import secrets
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, cast
from unittest import mock

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devmeter.db import connect
from devmeter.migrate import ensure_month_partitions, migrate
from metering import statements
from metering.catalog import load_catalog
from metering.peak import ACTIVE, ClassPeak, Event, compute_peaks, month_bounds
from metering.peak_frame import EVENTS_COPY, EndStates, close_peaks, peaks_many
from metering.peak_sql import sql_peaks_many
from metering.statements import close_month, month_start

REPO = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_PREFIX = "devmeter_bench_close_"

# Targets from issue 4.
TARGET_CLOSE_S = 15.0
TARGET_VS_BARE = 10.0
# "Linear" growth: the close may grow at most this much faster than the events do. Anything at
# or below the events' growth (fixed per-account costs make it sublinear) meets it.
LINEAR_SLACK = 1.2

# Every 50th account in UTC and every 50th (offset 25) in New York: the close groups accounts
# by time zone, so the benchmark must have more than one group, with most accounts in the big one.
TIMEZONES_SQL = """
    CASE WHEN n %% 50 = 0 THEN 'UTC' WHEN n %% 50 = 25 THEN 'America/New_York'
         ELSE 'Asia/Tokyo' END
"""


PeaksMany = Callable[
    [psycopg.Connection[Any], Sequence[int], datetime, datetime], dict[int, dict[str, ClassPeak]]
]


def db(url: str, *, autocommit: bool = False) -> psycopg.Connection[dict[str, Any]]:
    """devmeter.db.connect with rows typed loosely: the benchmark reads its own known columns."""
    return cast("psycopg.Connection[dict[str, Any]]", connect(url, autocommit=autocommit))


def say(message: str) -> None:
    print(f"bench close: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- concurrency watch


class Watch:
    """Samples, once a second, whether the ingest benchmark runs and the load average.

    The machine is shared: a figure measured while bench/ingest.py ran is not comparable with
    one measured alone, so each timed phase says whether the two overlapped.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, bool, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        self.samples.append((time.monotonic(), ingest_bench_running(), os.getloadavg()[0]))

    def overlapped(self, start: float, end: float) -> bool:
        # The sample just before the window counts too: a short phase may fall between two.
        return any(s[1] for s in self.samples if start - 1.0 <= s[0] <= end)

    def max_load(self, start: float, end: float) -> float:
        inside = [s[2] for s in self.samples if start <= s[0] <= end + 1]
        return max(inside, default=os.getloadavg()[0])


def ingest_bench_running() -> bool:
    """What ``pgrep -f bench.ingest`` answers, without spawning pgrep every second."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # By argument, not substring: a shell loop that merely mentions bench.ingest
        # (`until ! pgrep -f bench.ingest`) is not the benchmark.
        if b"bench.ingest" in argv or any(a.endswith(b"bench/ingest.py") for a in argv):
            return True
        if argv[1:3] == [b"bench", b"ingest"] and argv[0].endswith(b"dev"):
            return True
    return False


# --------------------------------------------------------------------------- server and databases


@dataclass
class Server:
    url: str
    origin: str
    stop: Callable[[], None] = field(default=lambda: None, repr=False)


def find_server() -> Server:
    url = os.environ.get("DEVMETER_BENCH_DATABASE_URL", DEFAULT_URL)
    try:
        with psycopg.connect(url, connect_timeout=3):
            pass
        return Server(url, "DEVMETER_BENCH_DATABASE_URL" if url != DEFAULT_URL else "default URL")
    except psycopg.OperationalError as exc:
        say(f"{redact(url)} unreachable ({str(exc).strip().splitlines()[0]}); embedded PostgreSQL")
    from devmeter.embedded import start_postgres

    # Its own data directory, so it never shares a server with `devmeter up` or the tests, and
    # durable settings (fsync on), so commits cost what they cost in production.
    pg = start_postgres(REPO / ".devmeter" / "bench-postgres", stop_when_unused=False)
    return Server(pg.url, f"embedded PostgreSQL ({pg.data_dir})", pg.stop)


def redact(url: str) -> str:
    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    hidden = params.pop("password", None) is not None
    return make_conninfo("", **params) + (" password=<hidden>" if hidden else "")


def admin(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True)


@contextlib.contextmanager
def scratch_database(server_url: str, name: str) -> Iterator[str]:
    with admin(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        # FORCE: an interrupted query may still hold a session on it.
        with admin(server_url) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        say(f"dropped {name}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Shape:
    accounts: int
    devices: int
    events: int
    month: str
    seed: float
    #: Extra flips between each device's registration and the month's start (not scaled).
    history: int = 0


def generate(url: str, shape: Shape, mode: str) -> dict[str, Any]:
    """Accounts, devices and ``shape.events`` state events, all made in SQL.

    One registration event per device (nine in ten before the month, the rest within it); the
    remaining events are state flips at random seconds of the account's month, alternating
    active/inactive per device as real changes do. Devices go to accounts on a skewed draw
    (``random()^2``), so a few large accounts sit beside many small ones.
    """
    first = month_start(shape.month)
    flips = shape.events - shape.devices
    if flips < 0:
        raise SystemExit("--events must be at least --devices (one registration event each)")
    # Session settings for generation only: serial plans keep random() reproducible from the
    # seed (parallel workers have their own), and the big sorts stay in memory.
    with db(url, autocommit=True) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 0")
        conn.execute("SET work_mem = '512MB'")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SELECT setseed(%s)", (shape.seed,))
        conn.execute(
            sql.SQL(
                """
                INSERT INTO accounts (ref, name, plan, country, timezone, signed_up_on)
                SELECT format('bench-%%s', lpad(n::text, 5, '0')), format('Bench account %%s', n),
                       'standard', tz.country, tz.name, %(first)s::date - 365
                FROM generate_series(1, %(accounts)s) n
                CROSS JOIN LATERAL (SELECT {tz} AS name) z
                CROSS JOIN LATERAL (SELECT z.name,
                    CASE z.name WHEN 'UTC' THEN 'US' WHEN 'America/New_York' THEN 'US'
                         ELSE 'JP' END AS country) tz
                ORDER BY n
                """
            ).format(tz=sql.SQL(TIMEZONES_SQL)),
            {"first": first, "accounts": shape.accounts},
        )
        conn.execute(
            """
            CREATE TEMP TABLE bench_devices AS
            WITH draws AS MATERIALIZED (
                SELECT n, 1 + floor(%(accounts)s * random() ^ 2)::int AS account_n,
                       random() AS r_reg, random() AS r_when
                FROM generate_series(1, %(devices)s) n
            )
            SELECT d.n, format('bd-%%s', lpad(d.n::text, 7, '0')) AS id, a.id AS account_id,
                   CASE WHEN d.n %% 10 < 6 THEN 'lte-m' WHEN d.n %% 10 < 9 THEN 'wifi'
                        ELSE 'gateway' END AS device_class,
                   b.lo, b.hi,
                   date_trunc('second', CASE
                       WHEN d.r_reg < 0.9 THEN b.lo - interval '1 day' * (1 + 180 * d.r_when)
                       ELSE b.lo + (b.hi - b.lo) * 0.8 * d.r_when END) AS registered_at
            FROM draws d
            JOIN accounts a ON a.ref = format('bench-%%s', lpad(d.account_n::text, 5, '0'))
            CROSS JOIN LATERAL (
                SELECT %(first)s::timestamp AT TIME ZONE a.timezone AS lo,
                       (%(first)s::timestamp + interval '1 month') AT TIME ZONE a.timezone AS hi
            ) b
            """,
            {"accounts": shape.accounts, "devices": shape.devices, "first": first},
        )
        conn.execute("CREATE UNIQUE INDEX ON bench_devices (n)")
        span = conn.execute(
            "SELECT min(registered_at) AS lo, max(hi) AS hi FROM bench_devices"
        ).fetchone()
        assert span is not None
        if mode == "plain":
            # migrate() covers months around today only; the benchmark's month may be elsewhere.
            ensure_month_partitions(conn, span["lo"], span["hi"] + timedelta(days=1))
        say(f"  {shape.accounts} accounts, {shape.devices} devices; inserting events ...")
        # As an import does: the usage figures (migration 0014) rebuilt per account afterwards,
        # not kept event by event by their trigger.
        conn.execute("SELECT set_config('devmeter.usage_bulk', 'on', false)")
        # ORDER BY time: ids then follow event time, as they do for events ingested live, and
        # within one device and second the later flip gets the larger id (D3's tie-break).
        conn.execute(
            """
            INSERT INTO device_state_events
                (time, device_id, account_id, device_class, state, source, received_at)
            WITH picks AS MATERIALIZED (
                SELECT 1 + floor(random() * %(devices)s)::int AS n, random() AS r
                FROM generate_series(1, %(flips)s)
            ),
            past AS MATERIALIZED (
                SELECT 1 + floor(random() * %(devices)s)::int AS n, random() AS r
                FROM generate_series(1, %(history)s)
            ),
            raw AS (
                SELECT id AS device_id, account_id, device_class, registered_at AS time, 0 AS k
                FROM bench_devices
                UNION ALL
                SELECT b.id, b.account_id, b.device_class,
                       date_trunc('second', greatest(b.lo, b.registered_at)
                                  + p.r * (b.hi - greatest(b.lo, b.registered_at))), 1
                FROM picks p JOIN bench_devices b USING (n)
                UNION ALL
                SELECT b.id, b.account_id, b.device_class,
                       date_trunc('second', b.registered_at + p.r * (b.lo - b.registered_at)), 1
                FROM past p JOIN bench_devices b USING (n)
                WHERE b.registered_at < b.lo
            ),
            ordered AS (
                SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY time, k) AS rn
                FROM raw
            )
            SELECT time, device_id, account_id, device_class,
                   CASE WHEN rn %% 2 = 1 THEN 'active' ELSE 'inactive' END,
                   CASE WHEN k = 0 THEN 'registration' WHEN rn %% 2 = 1 THEN 'heartbeat'
                        ELSE 'timeout' END,
                   time + interval '1 second' * (0.2 + 3 * random())
            FROM ordered
            ORDER BY time, rn
            """,
            {"devices": shape.devices, "flips": flips, "history": shape.history},
        )
        conn.execute("SELECT set_config('devmeter.usage_bulk', 'off', false)")
        conn.execute("SELECT devmeter_usage_rebuild(id) FROM accounts ORDER BY id")
        conn.execute(
            """
            INSERT INTO devices (id, account_id, device_class, key_prefix, key_hash,
                                 registered_at, state, state_at, last_seen_at)
            SELECT b.id, b.account_id, b.device_class, 'dmk_' || left(encode(h.hash, 'hex'), 8),
                   h.hash, b.registered_at, l.state, l.time, l.time
            FROM bench_devices b
            CROSS JOIN LATERAL (
                SELECT sha256(convert_to('devmeter-bench:' || b.id, 'UTF8')) AS hash
            ) h
            CROSS JOIN LATERAL (
                SELECT state, time FROM device_state_events e
                WHERE e.account_id = b.account_id AND e.device_id = b.id
                ORDER BY time DESC, id DESC LIMIT 1
            ) l
            ORDER BY b.n
            """
        )
        say("  VACUUM (ANALYZE) ...")
        # A month of live ingest leaves the table vacuumed (hint bits set, visibility map
        # current) and analysed; a fresh bulk load would make the first reader pay for that.
        conn.execute("VACUUM (ANALYZE)")
        rows = conn.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE source = 'registration') AS reg"
            " FROM device_state_events"
        ).fetchone()
        assert rows is not None
        return {"rows": int(rows["n"]), "registrations": int(rows["reg"])}


# --------------------------------------------------------------------------- measurements


@dataclass
class TimedConnect:
    """``connect`` for close_month, counting the connections it opens and how long that takes.

    Opening connections is part of the close (it once opened one per account); the count in
    the table shows how many the measured code opens.
    """

    url: str
    opens: int = 0
    seconds: float = 0.0

    def __call__(self) -> psycopg.Connection[Any]:
        started = time.perf_counter()
        conn = connect(self.url)
        self.seconds += time.perf_counter() - started
        self.opens += 1
        return conn


def groups(url: str, month: str) -> dict[str, list[int]]:
    with db(url) as conn:
        rows = conn.execute("SELECT id, timezone FROM accounts ORDER BY ref").fetchall()
    result: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        result[str(row["timezone"])].append(int(row["id"]))
    month_bounds(month, "UTC")  # refuse a bad --month before anything is timed
    return dict(sorted(result.items()))


def month_window(month: str, timezones: list[str]) -> tuple[datetime, datetime]:
    """The UTC span covering the month in every account's zone: what the bare scan counts."""
    bounds = [month_bounds(month, tz) for tz in timezones]
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def bare_scan(url: str, start: datetime, end: datetime) -> tuple[float, float, int]:
    """``count(*)`` over the month's events three times: (first, best of the others, count)."""
    timings: list[float] = []
    count = 0
    with db(url, autocommit=True) as conn:
        for _ in range(3):
            started = time.perf_counter()
            row = conn.execute(
                "SELECT count(*) AS n FROM device_state_events WHERE time >= %s AND time < %s",
                (start, end),
            ).fetchone()
            timings.append(time.perf_counter() - started)
            assert row is not None
            count = int(row["n"])
    return timings[0], min(timings[1:]), count


def peaks_alone(
    url: str, month: str, tz_groups: dict[str, list[int]], compute: PeaksMany
) -> dict[str, float]:
    """``compute`` per time zone, as close_month calls it (a fresh connection each)."""
    result: dict[str, float] = {}
    for tz, ids in tz_groups.items():
        start, end = month_bounds(month, tz)
        started = time.perf_counter()
        with db(url) as conn:
            compute(conn, ids, start, end)
        result[tz] = time.perf_counter() - started
    return result


def verify(url: str, month: str, accounts: int, failed: dict[str, str]) -> dict[str, Any]:
    with db(url) as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM statements WHERE month = %s", (month_start(month),)
        ).fetchone()
        failures = conn.execute("SELECT count(*) AS n FROM close_failures").fetchone()
    assert row is not None
    assert failures is not None
    statements = int(row["n"])
    return {
        "statements": statements,
        "accounts": accounts,
        "failed": len(failed),
        "close_failures_rows": int(failures["n"]),
        "ok": statements == accounts and not failed,
        "first_failures": dict(list(failed.items())[:3]),
    }


def spot_check(url: str, month: str, how_many: int, seed: float) -> list[dict[str, Any]]:
    """Stored peaks of a few accounts against compute_peaks on their events from the DB.

    The largest account, one per minority time zone, and random others.
    """
    with db(url) as conn:
        largest = conn.execute(
            "SELECT account_id FROM devices GROUP BY account_id ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        minority = conn.execute(
            "SELECT DISTINCT ON (timezone) id FROM accounts WHERE timezone <> 'Asia/Tokyo'"
            " ORDER BY timezone, id"
        ).fetchall()
        everyone = [int(r["id"]) for r in conn.execute("SELECT id FROM accounts ORDER BY id")]
        picked: list[int] = []
        for candidate in [
            *([int(largest["account_id"])] if largest else []),
            *(int(r["id"]) for r in minority),
            *random.Random(seed).sample(everyone, min(len(everyone), how_many)),
        ]:
            if candidate not in picked:
                picked.append(candidate)
        picked = picked[: max(how_many, 1)]
        results: list[dict[str, Any]] = []
        for account_id in picked:
            account = conn.execute(
                "SELECT ref, timezone FROM accounts WHERE id = %s", (account_id,)
            ).fetchone()
            assert account is not None
            start, end = month_bounds(month, str(account["timezone"]))
            events = [
                Event(r["time"], r["device_id"], r["device_class"], r["state"], r["id"])
                for r in conn.execute(
                    "SELECT time, id, device_id, device_class, state FROM device_state_events"
                    " WHERE account_id = %s AND time < %s",
                    (account_id, end),
                )
            ]
            expected = compute_peaks(events, start, end)
            stored = {
                r["device_class"]: (r["peak"], r["peak_at"], tuple(r["device_ids"]))
                for r in conn.execute(
                    "SELECT p.device_class, p.peak, p.peak_at, p.device_ids"
                    " FROM statement_peaks p JOIN statements s ON s.id = p.statement_id"
                    " WHERE s.account_id = %s AND s.month = %s",
                    (account_id, month_start(month)),
                )
            }
            wanted = {c: (p.peak, p.peak_at, p.device_ids) for c, p in expected.items()}
            results.append(
                {
                    "account": account["ref"],
                    "timezone": account["timezone"],
                    "events": len(events),
                    "peaks": {c: v[0] for c, v in sorted(wanted.items())},
                    "match": stored == wanted,
                }
            )
    return results


def naive_loop(
    url: str, month: str, sample: int, seed: float
) -> tuple[float, int, int, dict[tuple[int, str], int]]:
    """What a close without SQL window functions does: one query per device, replay in Python.

    For each device: fetch its events up to the month's end, reduce history to its state at
    the start, then add +1/-1 at each instant where it turns active/inactive into a
    per-(account, class) timeline; finally sweep each timeline for its maximum, applying an
    instant's changes together (M3). Returns (seconds, devices done, devices total, peaks).
    """
    with db(url) as conn:
        devices = conn.execute(
            "SELECT d.id, d.account_id, d.device_class, a.timezone"
            " FROM devices d JOIN accounts a ON a.id = d.account_id ORDER BY d.id"
        ).fetchall()
    total = len(devices)
    chosen = (
        devices if sample <= 0 or sample >= total else random.Random(seed).sample(devices, sample)
    )
    bounds = {tz: month_bounds(month, tz) for tz in {str(d["timezone"]) for d in devices}}
    started = time.perf_counter()
    timelines: dict[tuple[int, str], dict[datetime, int]] = defaultdict(lambda: defaultdict(int))
    with db(url) as conn:
        for device in chosen:
            start, end = bounds[str(device["timezone"])]
            rows = conn.execute(
                "SELECT time, id, state FROM device_state_events"
                " WHERE device_id = %s AND time < %s ORDER BY time, id",
                (device["id"], end),
            ).fetchall()
            # The device's state after each instant it was touched; history before the month
            # collapses into its first instant, and the last event at an instant wins.
            after: dict[datetime, bool] = {}
            for row in rows:
                instant = max(row["time"], start)
                after[instant] = row["state"] == ACTIVE
            timeline = timelines[(int(device["account_id"]), str(device["device_class"]))]
            was = False
            for instant, active in after.items():
                if active != was:
                    timeline[instant] += 1 if active else -1
                    was = active
        peaks: dict[tuple[int, str], int] = {}
        for key, timeline in timelines.items():
            running = best = 0
            for instant in sorted(timeline):
                running += timeline[instant]
                best = max(best, running)
            peaks[key] = best
    return time.perf_counter() - started, len(chosen), total, peaks


def copy_floor(url: str, month: str, tz_groups: dict[str, list[int]]) -> float:
    """The events' COPY that ``peaks_many`` reads, per time zone, read and thrown away."""
    seconds = 0.0
    for tz, ids in tz_groups.items():
        _start, end = month_bounds(month, tz)
        with db(url) as conn:
            started = time.perf_counter()
            with conn.cursor().copy(EVENTS_COPY, {"account_ids": ids, "end": end}) as copy:
                for _chunk in copy:
                    pass
            seconds += time.perf_counter() - started
    return seconds


def _previous_month(month: str) -> str:
    first = month_start(month)
    before = first - timedelta(days=1)
    return f"{before.year:04d}-{before.month:02d}"


def wipe_statements(url: str) -> None:
    """Delete every statement so the month can be closed again: scratch database only.

    The statements tables refuse UPDATE and DELETE by trigger (M5); USER triggers are turned
    off around the delete, foreign keys stay on.
    """
    tables = ("statement_peaks", "statement_lines", "statements")
    with db(url, autocommit=True) as conn:
        with conn.transaction():
            for table in tables:
                conn.execute(
                    sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(table))
                )
            for table in tables:
                conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
            for table in tables:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(table))
                )
        conn.execute("VACUUM (ANALYZE) statements, statement_lines, statement_peaks")


def profile_close(url: str, month: str, now: datetime) -> tuple[float, dict[str, float], str]:
    """close_month as the CLI calls it, under cProfile: (wall seconds while profiled,
    cumulative seconds of the close's parts, the top of the profile by own time)."""
    catalog = load_catalog()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    report = close_month(lambda: connect(url), catalog, month, now=now)
    profiler.disable()
    seconds = time.perf_counter() - started
    if report.failed:
        say(f"  profiled close: {len(report.failed)} accounts failed")
    stats = pstats.Stats(profiler)
    parts: dict[str, float] = {}
    wanted = {
        ("peak_frame.py", "peaks_many"): "peaks_many (peaks)",
        ("db.py", "connect"): "devmeter.db.connect (open)",
        ("statements.py", "_insert_statement"): "_insert_statement (all inserts)",
        ("statements.py", "_price"): "_price (pricing)",
        ("connection.py", "__exit__"): "Connection.__exit__ (commit+close)",
        ("connection.py", "close"): "Connection.close",
    }
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = getattr(stats, "stats", {})
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in raw.items():
        for (suffix, function), label in wanted.items():
            if filename.endswith(suffix) and name == function:
                parts[label] = parts.get(label, 0.0) + cumulative
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(10)
    site = str(Path(psycopg.__file__).parent.parent) + "/"
    top = "\n".join(
        line.replace(site, "").replace(str(REPO) + "/", "")
        for line in out.getvalue().splitlines()
        if line.strip() and "function calls" not in line and "List reduced" not in line
    )
    return seconds, parts, top


@dataclass
class CloseRun:
    seconds: float
    overlapped_ingest: bool
    max_load: float
    #: peaks_many's time inside this close, per time zone.
    peaks_s: dict[str, float]
    connects: int
    connect_s: float
    closed: int
    failed: dict[str, str]

    @property
    def peak_total_s(self) -> float:
        return sum(self.peaks_s.values())

    @property
    def rest_s(self) -> float:
        # Everything besides the peaks: reading accounts, connections, pricing, and a
        # transaction of inserts per account.
        return self.seconds - self.peak_total_s


def close_once(url: str, month: str, now: datetime, zones: list[str], watch: Watch) -> CloseRun:
    """close_month for all accounts as the CLI calls it, timed end to end.

    The peaks are timed inside this same close, by wrapping the ``peaks_many``
    that metering.statements calls: timing them in a separate call afterwards gives a
    breakdown that does not add up on a machine whose load changes from minute to minute.
    """
    by_bounds = {month_bounds(month, tz): tz for tz in zones}
    inside: dict[str, float] = {}
    # The function close_month calls; patched by name in metering.statements below.
    real = close_peaks

    def timed_peaks(
        conn: psycopg.Connection[Any],
        account_ids: Any,
        start: datetime,
        end: datetime,
        *,
        distinct: frozenset[str] = frozenset(),
    ) -> tuple[dict[int, dict[str, ClassPeak]], EndStates]:
        started = time.perf_counter()
        try:
            return real(conn, account_ids, start, end, distinct=distinct)
        finally:
            zone = by_bounds.get((start, end), f"{start:%Y-%m-%d %H:%M}")
            inside[zone] = inside.get(zone, 0.0) + time.perf_counter() - started

    catalog = load_catalog()
    opener = TimedConnect(url)
    with mock.patch.object(statements, "close_peaks", timed_peaks):
        report, phase = timed(watch, lambda: close_month(opener, catalog, month, now=now))
    return CloseRun(
        phase.seconds,
        phase.overlapped_ingest,
        phase.max_load,
        inside,
        opener.opens,
        opener.seconds,
        len(report.closed),
        dict(report.failed),
    )


# --------------------------------------------------------------------------- one scale


@dataclass
class Phase:
    seconds: float
    overlapped_ingest: bool
    max_load: float


@dataclass
class ScaleResult:
    scale: float
    database: str
    storage_mode: str
    events: int
    rows_in_month_window: int
    generation: Phase
    bare_cold_s: float
    bare: Phase
    #: Every timed close, in order; the figures use the fastest (the least disturbed).
    close_runs: list[CloseRun]
    peaks_alone_s: dict[str, float]
    #: The SQL path (the fall-back) on its own, for comparison.
    sql_alone_s: dict[str, float]
    #: The events' COPY that peaks_many reads, alone (best of two).
    copy_floor_s: float
    naive: Phase
    naive_devices: int
    naive_total_devices: int
    naive_extrapolated_s: float
    verification: dict[str, Any]
    spot_checks: list[dict[str, Any]]
    diagnosis_errors: list[str] = field(default_factory=list)
    profile_top: str | None = None
    profile_parts: dict[str, float] | None = None
    profiled_close_s: float | None = None

    @property
    def close(self) -> CloseRun:
        return min(self.close_runs, key=lambda run: run.seconds)


def timed(watch: Watch, action: Callable[[], Any]) -> tuple[Any, Phase]:
    start = time.monotonic()
    value = action()
    end = time.monotonic()
    overlapped = watch.overlapped(start, end) or ingest_bench_running()
    return value, Phase(end - start, overlapped, watch.max_load(start, end))


def run_scale(
    server_url: str,
    base_name: str,
    shape: Shape,
    scale: float,
    args: argparse.Namespace,
    watch: Watch,
    *,
    profile: bool,
) -> ScaleResult:
    events = round(shape.events * scale)
    name = f"{base_name}_x{f'{scale:g}'.replace('.', '_')}"
    scaled = Shape(shape.accounts, shape.devices, events, shape.month, shape.seed, shape.history)
    say(f"scale {scale:g}: {events:,} events into {name}")
    with scratch_database(server_url, name) as url:
        say("  migrating ...")
        result = migrate(url, storage=args.storage)
        say(f"  storage mode {result.mode}")
        counts, generation = timed(watch, lambda: generate(url, scaled, result.mode))
        say(f"  generated {counts['rows']:,} events in {generation.seconds:.1f} s")

        tz_groups = groups(url, shape.month)
        start, end = month_window(shape.month, list(tz_groups))
        (cold, _warm, in_window), bare = timed(watch, lambda: bare_scan(url, start, end))
        # The baseline is a warm count; the phase's own time covers all three.
        bare = Phase(_warm, bare.overlapped_ingest, bare.max_load)
        say(f"  bare count(*): {in_window:,} rows, {bare.seconds * 1000:.0f} ms warm")

        # After the latest zone's month end plus grace, so every account is due.
        now = max(month_bounds(shape.month, tz)[1] for tz in tz_groups) + timedelta(days=1)
        if not args.no_snapshot:
            # As in production, the month before was closed first: its close left the snapshot
            # of Active devices this close starts from, instead of the history.
            previous = _previous_month(shape.month)
            say(f"  closing {previous} first (untimed): the snapshot this close starts from")
            close_month(lambda: connect(url), load_catalog(), previous, now=now)
        runs: list[CloseRun] = []
        for attempt in range(args.repeat):
            if attempt:
                wipe_statements(url)
            say(f"  closing the month for all accounts ({attempt + 1}/{args.repeat}) ...")
            run = close_once(url, shape.month, now, list(tz_groups), watch)
            runs.append(run)
            say(
                f"  close_month: {run.closed} closed, {len(run.failed)} failed in "
                f"{run.seconds:.2f} s (peaks {run.peak_total_s:.2f} s)"
            )
        failed = {ref: error for run in runs for ref, error in run.failed.items()}
        verification = verify(url, shape.month, shape.accounts, failed)
        checks = spot_check(url, shape.month, args.spot_check, shape.seed)
        say(
            f"  verified: {verification['statements']} statements, {verification['failed']} "
            f"failed; spot-check {sum(c['match'] for c in checks)}/{len(checks)} match"
        )
        alone, _ = timed(watch, lambda: peaks_alone(url, shape.month, tz_groups, peaks_many))
        say(f"  peaks_many called directly: {sum(alone.values()):.2f} s")
        sql_alone, _ = timed(
            watch, lambda: peaks_alone(url, shape.month, tz_groups, sql_peaks_many)
        )
        say(f"  sql_peaks_many (the SQL path) called directly: {sum(sql_alone.values()):.2f} s")
        copy_s, _ = timed(watch, lambda: min(copy_floor(url, shape.month, tz_groups) for _ in "ab"))
        say(f"  the events' COPY alone: {copy_s:.2f} s")
        (naive_s, done, total, _), naive = timed(
            watch, lambda: naive_loop(url, shape.month, args.naive_sample, shape.seed)
        )
        naive = Phase(naive_s, naive.overlapped_ingest, naive.max_load)
        extrapolated = naive_s * total / done if done else 0.0
        say(f"  naive loop: {done:,} devices in {naive_s:.2f} s")

        scale_result = ScaleResult(
            scale=scale,
            database=name,
            storage_mode=result.mode,
            events=counts["rows"],
            rows_in_month_window=in_window,
            generation=generation,
            bare_cold_s=cold,
            bare=bare,
            close_runs=runs,
            peaks_alone_s=alone,
            sql_alone_s=sql_alone,
            copy_floor_s=copy_s,
            naive=naive,
            naive_devices=done,
            naive_total_devices=total,
            naive_extrapolated_s=extrapolated,
            verification=verification,
            spot_checks=checks,
        )
        best = scale_result.close.seconds
        missed = best >= TARGET_CLOSE_S or best > TARGET_VS_BARE * bare.seconds
        if profile and (args.diagnose == "always" or (args.diagnose == "auto" and missed)):
            # A diagnosis that fails (the close's code changes under this benchmark) is
            # reported, not allowed to throw away the figures measured above.
            try:
                say("  diagnosing: the close again, under cProfile ...")
                wipe_statements(url)
                profiled, parts, top = profile_close(url, shape.month, now)
                scale_result.profiled_close_s = profiled
                scale_result.profile_parts = parts
                scale_result.profile_top = top
            except Exception as exc:
                scale_result.diagnosis_errors.append(f"profile: {type(exc).__name__}: {exc}")
        return scale_result


# --------------------------------------------------------------------------- report


def machine_info(server_url: str, origin: str, storage: str) -> dict[str, Any]:
    with db(server_url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = {
            str(r["name"]): str(r["setting"]) + (str(r["unit"]) if r["unit"] else "")
            for r in conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name IN ('shared_buffers',"
                " 'work_mem', 'max_parallel_workers_per_gather', 'jit', 'fsync',"
                " 'synchronous_commit')"
            )
        }
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    code = {
        name: hashlib.sha256((REPO / name).read_bytes()).hexdigest()[:12]
        for name in ("metering/peak.sql", "metering/peak_sql.py", "metering/statements.py")
    }
    return {
        "code_sha256": code,
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "python": platform.python_version(),
        "postgresql": str(version["server_version"]) if version else "?",
        "server": f"{redact(server_url)} ({origin})",
        "storage_mode": storage,
        "settings": settings,
        "loadavg_at_start": os.getloadavg(),
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def render(
    machine: dict[str, Any], shape: Shape, results: list[ScaleResult], args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    add = lines.append
    add("Month close benchmark (bench/close.py)")
    add(
        f"  machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']}, "
        f"Python {machine['python']}"
    )
    add(
        f"  PostgreSQL {machine['postgresql']}, storage {machine['storage_mode']}, "
        f"{machine['server']}"
    )
    add("  settings: " + ", ".join(f"{k}={v}" for k, v in sorted(machine["settings"].items())))
    # The close's code changes under this benchmark; the hashes say which version was measured.
    add("  code: " + ", ".join(f"{k} {v}" for k, v in machine["code_sha256"].items()))
    add(
        f"  data: {shape.accounts:,} accounts, {shape.devices:,} devices, month {shape.month}, "
        f"history events {shape.history:,}, seed {shape.seed}; "
        f"load average at start {machine['loadavg_at_start'][0]:.2f}"
    )
    add("")
    header = f"  {'':34}" + "".join(f"{f'x{r.scale:g}':>14}" for r in results)
    add("Figures (seconds unless noted)")
    add(header)

    def row(label: str, values: list[str]) -> None:
        add(f"  {label:34}" + "".join(f"{v:>14}" for v in values))

    row("events (rows)", [f"{r.events:,}" for r in results])
    row("  in the month window", [f"{r.rows_in_month_window:,}" for r in results])
    row("  before it (history)", [f"{r.events - r.rows_in_month_window:,}" for r in results])
    row("generation (not timed below)", [f"{r.generation.seconds:.1f}" for r in results])
    row("bare count(*), cold", [f"{r.bare_cold_s:.3f}" for r in results])
    row("bare count(*), warm [baseline]", [f"{r.bare.seconds:.3f}" for r in results])
    repeats = max(len(r.close_runs) for r in results)
    row(
        f"close_month, all accounts, best of {repeats}",
        [f"{r.close.seconds:.2f}" for r in results],
    )
    row("  every run", [", ".join(f"{c.seconds:.1f}" for c in r.close_runs) for r in results])
    row("  peaks (peaks_many)", [f"{r.close.peak_total_s:.2f}" for r in results])
    for tz in results[0].close.peaks_s:
        row(f"    {tz}", [f"{r.close.peaks_s.get(tz, 0):.2f}" for r in results])
    row("  rest (inserts, connects, pricing)", [f"{r.close.rest_s:.2f}" for r in results])
    row(
        "    of which opening connections",
        [f"{r.close.connect_s:.2f} ({r.close.connects})" for r in results],
    )
    row(
        "peaks_many called directly",
        [f"{sum(r.peaks_alone_s.values()):.2f}" for r in results],
    )
    row(
        "  events' COPY alone [floor]",
        [f"{r.copy_floor_s:.2f}" for r in results],
    )
    row(
        "sql_peaks_many (SQL path) directly",
        [f"{sum(r.sql_alone_s.values()):.2f}" for r in results],
    )
    row(
        "naive loop, measured",
        [f"{r.naive.seconds:.2f}" for r in results],
    )
    row(
        "  devices in the sample",
        [f"{r.naive_devices:,}/{r.naive_total_devices:,}" for r in results],
    )
    extrapolated = any(r.naive_devices < r.naive_total_devices for r in results)
    row(
        "naive loop, all devices" + (" (extrap.)" if extrapolated else ""),
        [f"{r.naive_extrapolated_s:.1f}" for r in results],
    )
    row(
        "statements / accounts, failed",
        [
            f"{r.verification['statements']}/{r.verification['accounts']}, "
            f"{r.verification['failed']}"
            for r in results
        ],
    )
    row(
        "spot-check vs compute_peaks",
        [f"{sum(c['match'] for c in r.spot_checks)}/{len(r.spot_checks)} ok" for r in results],
    )
    row(
        "bench.ingest running during a close",
        ["yes" if any(c.overlapped_ingest for c in r.close_runs) else "no" for r in results],
    )
    row(
        "max load average during close",
        [f"{max(c.max_load for c in r.close_runs):.2f}" for r in results],
    )
    add("")
    add("Ratios")
    row("close / bare scan", [f"{r.close.seconds / r.bare.seconds:.0f}x" for r in results])
    row(
        "peaks / bare scan",
        [f"{r.close.peak_total_s / r.bare.seconds:.0f}x" for r in results],
    )
    row(
        "events' COPY alone / bare scan",
        [f"{r.copy_floor_s / r.bare.seconds:.0f}x" for r in results],
    )
    row(
        "naive / close" + (" (naive extrap.)" if extrapolated else ""),
        [f"{r.naive_extrapolated_s / r.close.seconds:.1f}x" for r in results],
    )
    first = results[0]
    growth: list[dict[str, float]] = []
    for r in results[1:]:
        g = {
            "scale": r.scale,
            "events": r.events / first.events,
            "close": r.close.seconds / first.close.seconds,
            "peak_query": r.close.peak_total_s / first.close.peak_total_s,
            "bare_scan": r.bare.seconds / first.bare.seconds,
            "rest": r.close.rest_s / first.close.rest_s if first.close.rest_s > 0 else 0.0,
        }
        growth.append(g)
        add(
            f"  growth x{first.scale:g} -> x{r.scale:g}: events {g['events']:.2f}x, close "
            f"{g['close']:.2f}x, peak query {g['peak_query']:.2f}x, rest {g['rest']:.2f}x, bare "
            f"scan {g['bare_scan']:.2f}x"
        )
    add("")
    add("Targets (issue 4)")
    base = next((r for r in results if r.scale == 1), first)
    targets: dict[str, bool | None] = {
        "close_under_15s": base.close.seconds < TARGET_CLOSE_S,
        "close_within_10x_bare": base.close.seconds <= TARGET_VS_BARE * base.bare.seconds,
        "growth_linear": all(g["close"] <= LINEAR_SLACK * g["events"] for g in growth)
        if growth
        else None,
        "statements_ok": all(r.verification["ok"] for r in results),
        "spot_checks_ok": all(c["match"] for r in results for c in r.spot_checks),
    }
    add(
        f"  close under {TARGET_CLOSE_S:.0f} s (x{base.scale:g}): {base.close.seconds:.2f} s"
        f"  -> {met(bool(targets['close_under_15s']))}"
    )
    add(
        f"  close within {TARGET_VS_BARE:.0f}x the bare scan (x{base.scale:g}): "
        f"{base.close.seconds / base.bare.seconds:.0f}x  -> "
        f"{met(bool(targets['close_within_10x_bare']))}"
    )
    if growth:
        worst = max(growth, key=lambda g: g["close"] / g["events"])
        add(
            f"  growth linear (close grows <= {LINEAR_SLACK}x the events' growth): close "
            f"{worst['close']:.2f}x for {worst['events']:.2f}x events  -> "
            f"{met(bool(targets['growth_linear']))}"
        )
    else:
        add("  growth: one scale only (pass --scale 1,2)")
    add(
        f"  every account closed, none failed: {met(bool(targets['statements_ok']))}; "
        f"peaks agree with compute_peaks: {met(bool(targets['spot_checks_ok']))}"
    )
    for r in results:
        if r.profile_top is None and not r.diagnosis_errors:
            continue
        add("")
        add(f"Diagnosis at x{r.scale:g}")
        for error in r.diagnosis_errors:
            add(f"  failed: {error}")
        if r.profile_parts is not None:
            add(f"  close_month under cProfile: {r.profiled_close_s:.2f} s wall; cumulative:")
            for label, seconds in sorted(r.profile_parts.items(), key=lambda kv: -kv[1]):
                add(f"    {label:40} {seconds:8.2f}")
        if r.profile_top:
            add("  top functions by own time:")
            lines.extend("    " + line for line in r.profile_top.splitlines())
    data = {
        "machine": machine,
        "shape": asdict(shape),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "scales": [
            {
                **asdict(r),
                "close_best": {
                    **asdict(r.close),
                    "peak_total_s": r.close.peak_total_s,
                    "rest_s": r.close.rest_s,
                },
            }
            for r in results
        ],
        "growth": growth,
        "targets": targets,
    }
    return "\n".join(lines), data


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench close", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000, help="events at scale 1")
    parser.add_argument("--month", default="2026-10")
    parser.add_argument(
        "--scale",
        default="1,2",
        help="comma-separated multipliers of --events, one scratch database each (default 1,2)",
    )
    parser.add_argument(
        "--naive-sample",
        type=int,
        default=2000,
        help="devices the naive loop runs on, extrapolated to all (0: every device)",
    )
    parser.add_argument(
        "--history-events",
        type=int,
        default=0,
        help="extra flips before the month, between registration and the month's start "
        "(not scaled; shows what older history costs the close)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="closes timed per scale, statements deleted in between; the fastest is the "
        "figure (default 2: the machine is shared)",
    )
    parser.add_argument("--spot-check", type=int, default=5, help="accounts to re-check")
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="do not close the month before first: the close then reads the whole history",
    )
    parser.add_argument(
        "--diagnose",
        choices=["auto", "always", "never"],
        default="auto",
        help="cProfile of the close when a target is missed (auto), always, or never",
    )
    parser.add_argument("--storage", choices=["auto", "plain", "timescaledb"], default="auto")
    parser.add_argument("--seed", type=float, default=0.42, help="setseed() for generation")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        args.scales = [float(s) for s in args.scale.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--scale: expected numbers like 1,2, got {args.scale!r}")
    if not args.scales or any(s <= 0 for s in args.scales):
        parser.error("--scale: positive multipliers only")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = Shape(
        args.accounts, args.devices, args.events, args.month, args.seed, args.history_events
    )
    month_bounds(shape.month, "UTC")
    # SIGTERM takes the same way out as Ctrl-C, so the scratch databases are dropped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if ingest_bench_running():
        say("note: bench.ingest is running; figures will be marked as overlapping")
    server = find_server()
    base_name = DB_PREFIX + secrets.token_hex(4)
    results: list[ScaleResult] = []
    try:
        with Watch() as watch:
            machine = machine_info(server.url, server.origin, args.storage)
            for scale in args.scales:
                # cProfile once: where Python's time goes is the same at every scale; the plan
                # is redone per scale since its growth is the question.
                profile = not any(r.profile_top for r in results)
                results.append(
                    run_scale(server.url, base_name, shape, scale, args, watch, profile=profile)
                )
    except KeyboardInterrupt:
        say("interrupted; scratch databases dropped")
        return 130
    finally:
        server.stop()
    if results:
        machine["storage_mode"] = ", ".join(sorted({r.storage_mode for r in results}))
        text, data = render(machine, shape, results, args)
        data["finished_at"] = datetime.now(UTC).isoformat()
        print(text)
        if args.json:
            args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
            say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
