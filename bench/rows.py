"""PostgreSQL CPU per row (issue 11, item 5): what the ingest writer costs the database server.

    ./dev bench rows [--heartbeats 120000 --events 20000 --late 4000 --devices 20000
                      --accounts 20 --batch 2000 --small-batch 250 --json FILE]

Builds a scratch database on DEVMETER_BENCH_DATABASE_URL (an embedded PostgreSQL if that is
unreachable; the server must run on this machine, since its CPU is read from /proc) with
``--devices`` devices dealt to ``--accounts`` accounts, registered a day ago and changing state
once every four hours since (history made in SQL with the usage trigger off, the usage figures
rebuilt per account, as an import does). Then it calls the real writer,
``ingest.writer.write_batch``, with batches of ``ingest.processor.Heartbeat``:

1. heartbeats that do not change their device's state (the common case: each device once a
   simulated minute), in batches of ``--batch``; 1b: the same in batches of ``--small-batch``
   (a worker's batches are smaller when the stream is slower than its batch size per 200 ms);
2. heartbeats that each change their device's state, so each is a state event and runs the
   usage-model trigger (migrations 0014/0019) and the late-event trigger (0012);
3. the same with ``devmeter.usage_bulk`` on for the session, which makes the usage trigger
   return at once: 2 - 3 is the usage trigger's own cost per state event. Phases 2 and 3
   alternate batch by batch, so that both see the same tables, cache and machine load;
4. late heartbeats: each 30 s after one of phase 1's, in the other state (older than the
   device's latest, so a late state event), and the writer adds its successor (phase 1's next
   heartbeat, back in the old state) as a second one; both move the maintained counts of the
   later quarter hours and days.

Around each batch the bench reads the writer's backend's CPU time (utime + stime of
``/proc/<pg_backend_pid()>/stat``, in clock ticks; ``/proc/<pid>/schedstat``'s nanoseconds as
a cross-check) and its own (``time.process_time``). CPU times are the processes' own: they do
not move with what else the machine runs, as wall times do. ``track_functions = all`` on the
writer's session gives where the triggers' time goes (pg_stat_user_functions), and one batch of
phase 1 is run again under ``EXPLAIN ANALYZE`` and rolled back, to show where a batch's time
goes. At the end, ``VACUUM ANALYZE`` and the on-disk bytes per heartbeat row and per state
event row over the partitions that hold rows.

When the server runs without autovacuum (the CI configuration of these machines), the bench
does between batches, untimed and on its own connection, the VACUUM and ANALYZE that
autovacuum would start by the server's thresholds: otherwise the plans the triggers cache
while a table is nearly empty (sequential scans) stay for the whole run, which production,
with autovacuum, does not see.

Progress goes to stderr, the figures to stdout; the scratch database is dropped at the end,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import tuple_row

from bench.close import find_server, redact
from devmeter.db import connect
from devmeter.migrate import ensure_month_partitions, migrate
from ingest.processor import Heartbeat, State
from ingest.writer import _STAGE_TYPES, Q, WriteResult, write_batch

DB_PREFIX = "devmeter_bench_rows_"
TICK = os.sysconf("SC_CLK_TCK")
#: The history before the run: each device changes state once every this long (the capacity
#: model's assumption), over this long.
CHANGE_EVERY = timedelta(hours=4)
HISTORY = timedelta(days=1)

Conn = psycopg.Connection[dict[str, Any]]
Functions = dict[str, tuple[int, float, float]]


def say(message: str) -> None:
    print(f"bench rows: {message}", file=sys.stderr, flush=True)


def db(url: str, *, autocommit: bool = False) -> Conn:
    return cast("Conn", connect(url, autocommit=autocommit))


def admin(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True)


# --------------------------------------------------------------------------- CPU readings


@dataclass(frozen=True, slots=True)
class Cpu:
    """A process's CPU time: utime + stime in clock ticks, and schedstat's run time in ns."""

    ticks: int
    ns: int

    @staticmethod
    def of(pid: int) -> Cpu:
        # The fields after the command name, which is in parentheses and may hold spaces.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(stat[11]) + int(stat[12])  # utime and stime, fields 14 and 15 of stat
        ns = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        return Cpu(ticks, ns)


@dataclass(slots=True)
class Phase:
    name: str
    label: str
    batch: int
    batches: int = 0
    heartbeats: int = 0
    duplicates: int = 0
    events: int = 0
    wall_s: float = 0.0
    server_ticks: int = 0
    server_ns: int = 0
    client_s: float = 0.0
    note: str = ""
    #: pg_stat_user_functions over the phase: name -> (calls, total ms, self ms).
    functions: Functions = field(default_factory=dict)

    def add(self, result: WriteResult, wall: float, server: tuple[Cpu, Cpu], client: float) -> None:
        self.batches += 1
        self.heartbeats += result.heartbeats
        self.duplicates += result.duplicates
        self.events += result.events
        self.wall_s += wall
        self.server_ticks += server[1].ticks - server[0].ticks
        self.server_ns += server[1].ns - server[0].ns
        self.client_s += client

    @property
    def server_s(self) -> float:
        return self.server_ticks / TICK

    def us(self, seconds: float, rows: int | None = None) -> float:
        rows = self.heartbeats if rows is None else rows
        return seconds / rows * 1e6 if rows else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "server_s": self.server_s,
            "server_us_per_row": self.us(self.server_s),
            "server_schedstat_us_per_row": self.us(self.server_ns / 1e9),
            "client_us_per_row": self.us(self.client_s),
            "server_us_per_event": self.us(self.server_s, self.events),
        }


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    account_id: int
    device_class: str


def build(url: str, args: argparse.Namespace, t0: datetime, end: datetime) -> list[Device]:
    """Accounts and devices, Active since their registration a day before ``t0``, with a state
    change every four hours since (ending Active), the usage figures rebuilt from them."""
    with db(url, autocommit=True) as conn:
        ensure_month_partitions(conn, t0 - HISTORY - timedelta(days=1), end + timedelta(days=1))
        # Zones as in bench/close.py: the usage trigger keeps days in the account's zone.
        conn.execute(
            """
            INSERT INTO accounts (ref, name, plan, country, timezone, signed_up_on)
            SELECT format('rows-%%s', lpad(n::text, 5, '0')), format('Rows account %%s', n),
                   'standard', CASE WHEN n %% 10 IN (0, 5) THEN 'US' ELSE 'JP' END,
                   CASE WHEN n %% 10 = 0 THEN 'UTC' WHEN n %% 10 = 5 THEN 'America/New_York'
                        ELSE 'Asia/Tokyo' END,
                   %(t0)s::date - 30
            FROM generate_series(1, %(accounts)s) n ORDER BY n
            """,
            {"t0": t0, "accounts": args.accounts},
        )
        # Devices dealt to the accounts in turn; classes as in bench/close.py (6:3:1).
        conn.execute(
            """
            CREATE TEMP TABLE rows_devices AS
            SELECT n, format('rd-%%s', lpad(n::text, 7, '0')) AS id, a.id AS account_id,
                   CASE WHEN n %% 10 < 6 THEN 'lte-m' WHEN n %% 10 < 9 THEN 'wifi'
                        ELSE 'gateway' END AS device_class
            FROM generate_series(1, %(devices)s) n
            JOIN accounts a ON a.ref = format('rows-%%s',
                                              lpad((1 + (n - 1) %% %(accounts)s)::text, 5, '0'))
            """,
            {"devices": args.devices, "accounts": args.accounts},
        )
        registered = t0 - HISTORY - timedelta(hours=1)
        changes = HISTORY // CHANGE_EVERY
        if changes % 2:
            raise SystemExit("the history must end Active: an even number of changes")
        # As an import does: the events without the usage trigger, then the figures rebuilt
        # per account. The changes alternate Inactive, Active, ...; one at a pseudo-random
        # instant of each four hours, so that each quarter hour holds some.
        conn.execute("SELECT set_config('devmeter.usage_bulk', 'on', false)")
        conn.execute(
            """
            INSERT INTO device_state_events
                (time, device_id, account_id, device_class, state, source, received_at)
            SELECT e.time, b.id, b.account_id, b.device_class, e.state, e.source, e.time
            FROM rows_devices b
            CROSS JOIN LATERAL (
                SELECT %(registered)s::timestamptz AS time, 'active' AS state,
                       'registration' AS source
                UNION ALL
                SELECT %(t0)s::timestamptz - %(history)s::interval
                       + %(every)s::interval * (k + ((b.n * 7919 + k * 104729) %% 10007) / 10007.0),
                       CASE WHEN k %% 2 = 0 THEN 'inactive' ELSE 'active' END, 'heartbeat'
                FROM generate_series(0, %(changes)s - 1) k
            ) e
            ORDER BY e.time
            """,
            {
                "registered": registered,
                "t0": t0,
                "history": HISTORY,
                "every": CHANGE_EVERY,
                "changes": changes,
            },
        )
        conn.execute("SELECT set_config('devmeter.usage_bulk', 'off', false)")
        conn.execute("SELECT devmeter_usage_rebuild(id) FROM accounts ORDER BY id")
        conn.execute(
            """
            INSERT INTO devices (id, account_id, device_class, key_prefix, key_hash,
                                 registered_at, state, state_at, last_seen_at)
            SELECT b.id, b.account_id, b.device_class, 'dmk_' || left(encode(h.hash, 'hex'), 8),
                   h.hash, %(registered)s, 'active', l.time, l.time
            FROM rows_devices b
            CROSS JOIN LATERAL (
                SELECT sha256(convert_to('devmeter-bench-rows:' || b.id, 'UTF8')) AS hash
            ) h
            CROSS JOIN LATERAL (
                SELECT max(time) AS time FROM device_state_events e
                WHERE e.account_id = b.account_id AND e.device_id = b.id
            ) l
            ORDER BY b.n
            """,
            {"registered": registered},
        )
        conn.execute("VACUUM (ANALYZE)")
        rows = conn.execute("SELECT id, account_id, device_class FROM rows_devices ORDER BY n")
        return [Device(str(r["id"]), int(r["account_id"]), str(r["device_class"])) for r in rows]


class Clock:
    """The simulated time. Heartbeats come one per device per minute, one after another; state
    changes one per device every four hours (the history's rate), so that each quarter hour
    holds as many as the usage figures would see in service: the cost of recounting a quarter
    hour after a late event grows with the changes in it."""

    def __init__(self, t0: datetime, devices: int) -> None:
        self.now = t0
        self.heartbeat_step = timedelta(minutes=1) / devices
        self.change_step = CHANGE_EVERY / devices

    def tick(self, step: timedelta | None = None) -> datetime:
        self.now += self.heartbeat_step if step is None else step
        return self.now


class Fleet:
    """Each device's state and last seq, as the heartbeats written so far left them."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.devices = devices
        self.state: list[State] = ["active"] * len(devices)
        self.seq = [0] * len(devices)
        self.cursor = 0

    def next_index(self) -> int:
        i = self.cursor
        self.cursor = (self.cursor + 1) % len(self.devices)
        return i

    def heartbeat(self, i: int, at: datetime, state: State, received: datetime) -> Heartbeat:
        d = self.devices[i]
        self.seq[i] += 1
        return Heartbeat(
            at, d.id, d.account_id, d.device_class, state, self.seq[i], d.id, received
        )  # fmt: skip


def other(state: State) -> State:
    return "inactive" if state == "active" else "active"


def steady_batch(
    fleet: Fleet, clock: Clock, size: int, log: list[tuple[int, datetime]]
) -> list[Heartbeat]:
    """The next ``size`` devices in turn, each in the state it is in (no state event)."""
    batch = []
    for _ in range(size):
        i = fleet.next_index()
        at = clock.tick()
        log.append((i, at))
        batch.append(fleet.heartbeat(i, at, fleet.state[i], at + timedelta(seconds=1)))
    return batch


def change_batch(fleet: Fleet, clock: Clock, size: int) -> list[Heartbeat]:
    """The next ``size`` devices in turn, each in the other state (one state event each)."""
    batch = []
    for _ in range(size):
        i = fleet.next_index()
        fleet.state[i] = other(fleet.state[i])
        at = clock.tick(clock.change_step)
        batch.append(fleet.heartbeat(i, at, fleet.state[i], at + timedelta(seconds=1)))
    return batch


def late_batches(
    fleet: Fleet, picks: Sequence[tuple[int, datetime]], size: int, received: datetime
) -> Iterator[list[Heartbeat]]:
    """Inactive heartbeats 30 s after the given phase-1 heartbeats (of devices Active then,
    with a later phase-1 heartbeat, which becomes the successor event). Taken in phase 1's
    order, so a batch's devices are distinct (a batch is at most one heartbeat per device)."""
    for start in range(0, len(picks), size):
        yield [
            fleet.heartbeat(i, at + timedelta(seconds=30), "inactive", received)
            for i, at in picks[start : start + size]
        ]


# --------------------------------------------------------------------------- measuring


class Autovacuum:
    """Between batches, the VACUUM and ANALYZE autovacuum would start (its thresholds, from the
    server's settings), when the server runs without it. Untimed, on a connection of its own."""

    def __init__(self, url: str) -> None:
        self.conn = db(url, autocommit=True)
        settings = {
            str(r["name"]): str(r["setting"])
            for r in self.conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name LIKE 'autovacuum%%'"
            )
        }
        self.enabled = settings["autovacuum"] == "off"
        self.limits = {k: float(v) for k, v in settings.items() if k != "autovacuum"}
        self.runs: Counter[str] = Counter()
        self.seconds = 0.0

    def tick(self) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        lim = self.limits
        rows = self.conn.execute(
            """
            SELECT s.relid::regclass::text AS name, greatest(c.reltuples, 0) AS tuples,
                   s.n_dead_tup AS dead, s.n_mod_since_analyze AS modified,
                   s.n_ins_since_vacuum AS inserted
            FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
            WHERE c.relkind = 'r' AND c.relpersistence = 'p'
            """
        ).fetchall()
        for r in rows:
            tuples = float(r["tuples"])
            vacuum = int(r["dead"]) > (
                lim["autovacuum_vacuum_threshold"] + lim["autovacuum_vacuum_scale_factor"] * tuples
            ) or int(r["inserted"]) > (
                lim["autovacuum_vacuum_insert_threshold"]
                + lim["autovacuum_vacuum_insert_scale_factor"] * tuples
            )
            analyze = int(r["modified"]) > (
                lim["autovacuum_analyze_threshold"]
                + lim["autovacuum_analyze_scale_factor"] * tuples
            )
            if not (vacuum or analyze):
                continue
            table = sql.Identifier(*str(r["name"]).split(".", 1))
            if vacuum:
                self.conn.execute(
                    sql.SQL("VACUUM {}{}").format(
                        sql.SQL("(ANALYZE) ") if analyze else sql.SQL(""), table
                    )
                )
            else:
                self.conn.execute(sql.SQL("ANALYZE {}").format(table))
            self.runs[("vacuum " if vacuum else "") + ("analyze " if analyze else "") + "runs"] += 1
        self.seconds += time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


class Writer:
    """The writer's connection, its backend's pid, and batch-by-batch CPU accounting."""

    def __init__(self, url: str, autovacuum: Autovacuum) -> None:
        self.conn = db(url)
        self.autovacuum = autovacuum
        row = self.conn.execute(
            "SELECT pg_backend_pid() AS pid, current_setting('is_superuser') AS su"
        ).fetchone()
        assert row is not None
        self.pid = int(row["pid"])
        self.profiled = row["su"] == "on"
        if self.profiled:
            # Function call counts and times, for where the triggers' time goes.
            self.conn.execute("SET track_functions = 'all'")
        self.conn.commit()
        if not Path(f"/proc/{self.pid}/stat").exists():
            raise SystemExit(
                f"the writer's backend (pid {self.pid}) is not a process of this machine: the "
                "bench reads the server's CPU from /proc, so PostgreSQL must run here"
            )
        self.usage_bulk = False

    def set_usage_bulk(self, on: bool) -> None:
        if on != self.usage_bulk:
            self.conn.execute(
                "SELECT set_config('devmeter.usage_bulk', %s, false)", ("on" if on else "off",)
            )
            # Committed, so that write_batch's transaction is a transaction, not a savepoint.
            self.conn.commit()
            self.usage_bulk = on

    def write(self, phase: Phase, batch: Sequence[Heartbeat]) -> None:
        before = Cpu.of(self.pid)
        wall = time.perf_counter()
        client = time.process_time()
        result = write_batch(self.conn, batch, [])
        client = time.process_time() - client
        wall = time.perf_counter() - wall
        phase.add(result, wall, (before, Cpu.of(self.pid)), client)
        self.autovacuum.tick()

    def functions(self) -> Functions:
        """pg_stat_user_functions of devmeter's functions, as far as this backend flushed them."""
        if not self.profiled:
            return {}
        self.conn.execute("SELECT pg_stat_force_next_flush()")
        self.conn.commit()  # the backend flushes its pending counts when it goes idle
        time.sleep(0.05)
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = self.conn.execute(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions"
            " WHERE funcname LIKE 'devmeter%%'"
        ).fetchall()
        self.conn.commit()
        return {
            str(r["funcname"]): (int(r["calls"]), float(r["total_time"]), float(r["self_time"]))
            for r in rows
        }

    def explain(self, batch: Sequence[Heartbeat]) -> dict[str, Any]:
        """One batch staged as write_batch does, then the writer's statement under EXPLAIN
        ANALYZE; rolled back. Where a batch's time goes, node by node (instrumented, so slower
        than unobserved)."""
        with self.conn.transaction(force_rollback=True):
            self.conn.execute(Q["create_stage"])
            with self.conn.cursor(row_factory=tuple_row) as cur:
                with cur.copy(Q["copy_stage"]) as copy:
                    copy.set_types(_STAGE_TYPES)
                    for ord_, h in enumerate(batch):
                        copy.write_row(
                            (
                                ord_, h.time, h.device_id, h.account_id, h.device_class,
                                h.state, h.seq, h.reporter, h.received_at,
                            )
                        )  # fmt: skip
                row = cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + Q["apply_stage"]).fetchone()
        assert row is not None
        plan = row[0][0]
        ctes: dict[str, float] = {}
        worst: dict[str, Any] = {"rows_removed_by_join_filter": 0}

        def walk(node: dict[str, Any]) -> None:
            name = str(node.get("Subplan Name", ""))
            if name.startswith("CTE "):
                ctes[name[4:]] = float(node["Actual Total Time"])
            removed = int(node.get("Rows Removed by Join Filter", 0))
            if removed > worst["rows_removed_by_join_filter"]:
                worst.update(
                    rows_removed_by_join_filter=removed,
                    node=node["Node Type"],
                    join_filter=node.get("Join Filter"),
                    estimated_rows=node.get("Plan Rows"),
                    actual_rows=node.get("Actual Rows"),
                )
            for child in node.get("Plans", []):
                walk(child)

        walk(plan["Plan"])
        return {
            "batch": len(batch),
            "execution_ms": float(plan["Execution Time"]),
            "cte_ms": ctes,
            "worst_join": worst,
        }

    def close(self) -> None:
        self.conn.close()


def function_delta(before: Functions, after: Functions) -> Functions:
    out = {}
    for name, (calls, total, own) in after.items():
        c0, t0, s0 = before.get(name, (0, 0.0, 0.0))
        if calls - c0:
            out[name] = (calls - c0, total - t0, own - s0)
    return out


def check(phase: Phase, rows: int, events: int) -> None:
    """The run stops when the writer did not do what the phase is about."""
    if (phase.heartbeats, phase.duplicates, phase.events) != (rows, 0, events):
        raise SystemExit(
            f"{phase.name}: {phase.heartbeats} heartbeats stored, {phase.duplicates} duplicates, "
            f"{phase.events} state events; expected {rows}, 0, {events}"
        )


@dataclass
class Measured:
    phases: list[Phase]
    explain: dict[str, Any]
    autovacuum: dict[str, Any]


def measure(url: str, args: argparse.Namespace, devices: list[Device], t0: datetime) -> Measured:
    fleet = Fleet(devices)
    clock = Clock(t0, len(devices))
    small = max(1, args.heartbeats // 4)
    steady = Phase("steady", "1. no state change", args.batch)
    steady_small = Phase("steady_small", "1b. no state change", args.small_batch)
    flips = Phase("changes", "2. state change, usage trigger on", args.batch)
    bulk = Phase("changes_bulk", "3. state change, usage trigger off", args.batch)
    late = Phase("late", "4. late state change", args.batch)
    autovacuum = Autovacuum(url)
    if autovacuum.enabled:
        say("the server runs without autovacuum: the bench does its VACUUM/ANALYZE between batches")
    writer = Writer(url, autovacuum)
    log: list[tuple[int, datetime]] = []

    def steady_phase(phase: Phase, rows: int) -> None:
        for n in range(0, rows, phase.batch):
            writer.write(phase, steady_batch(fleet, clock, min(phase.batch, rows - n), log))
        check(phase, rows, 0)

    try:
        functions = writer.functions()
        say(f"phase 1: {args.heartbeats:,} heartbeats, no state change, batches of {args.batch}")
        steady_phase(steady, args.heartbeats)
        say(f"phase 1b: {small:,} more in batches of {args.small_batch}")
        steady_phase(steady_small, small)
        after = writer.functions()
        steady.functions, functions = function_delta(functions, after), after
        say("  one more batch under EXPLAIN ANALYZE, rolled back")
        explained = writer.explain(steady_batch(fleet, clock, args.batch, []))

        say(f"phases 2 and 3: {args.events:,} state changes each, batches alternating")
        done = {True: 0, False: 0}
        on = True
        while done[True] < args.events or done[False] < args.events:
            if done[on] >= args.events:
                on = not on
            size = min(args.batch, args.events - done[on])
            writer.set_usage_bulk(not on)
            writer.write(flips if on else bulk, change_batch(fleet, clock, size))
            done[on] += size
            on = not on
        writer.set_usage_bulk(False)
        check(flips, args.events, args.events)
        check(bulk, args.events, args.events)
        # Both phases' counts together: in phase 3 the usage trigger returns at once.
        after = writer.functions()
        flips.functions, functions = function_delta(functions, after), after

        say("  (untimed) the usage figures rebuilt after phase 3's writes without them")
        with db(url, autocommit=True) as conn:
            conn.execute("SELECT devmeter_usage_rebuild(id) FROM accounts ORDER BY id")
        # Phase 1's first heartbeats, each with a later one of its device.
        picks = log[: min(args.late, len(log) - len(devices))]
        lateness = [(clock.now - at).total_seconds() / 3600 for _, at in picks]
        late.note = (
            f"late by {min(lateness):.1f}-{max(lateness):.1f} h "
            f"(median {statistics.median(lateness):.1f})"
        )
        say(f"phase 4: {len(picks):,} late heartbeats, each a state change, {late.note}")
        for batch in late_batches(fleet, picks, args.batch, clock.now):
            writer.write(late, batch)
        # Each late heartbeat and its successor, the next heartbeat back in the old state.
        check(late, len(picks), 2 * len(picks))
        late.functions = function_delta(functions, writer.functions())
    finally:
        writer.close()
        autovacuum.close()
    return Measured(
        [steady, steady_small, flips, bulk, late],
        explained,
        {
            "emulated": autovacuum.enabled,
            "runs": dict(autovacuum.runs),
            "seconds": autovacuum.seconds,
        },
    )


def disk(url: str) -> dict[str, Any]:
    """Bytes per row of the time series, over the partitions that hold rows, after VACUUM."""
    say("VACUUM (ANALYZE) and table sizes")
    out: dict[str, Any] = {}
    with db(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) heartbeats, device_state_events")
        for table in ("heartbeats", "device_state_events"):
            parts = conn.execute(
                "SELECT c.oid::regclass::text AS name FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = %s::regclass ORDER BY 1",
                (table,),
            ).fetchall()
            rows = heap = total = 0
            touched = []
            for p in parts:
                r = conn.execute(
                    sql.SQL(
                        "SELECT count(*) AS n, pg_table_size(%(t)s::regclass) AS heap,"
                        " pg_total_relation_size(%(t)s::regclass) AS total FROM {}"
                    ).format(sql.Identifier(str(p["name"]))),
                    {"t": str(p["name"])},
                ).fetchone()
                assert r is not None
                if int(r["n"]):
                    touched.append(str(p["name"]))
                    rows += int(r["n"])
                    heap += int(r["heap"])
                    total += int(r["total"])
            nan = float("nan")
            out[table] = {
                "partitions": touched,
                "rows": rows,
                "table_bytes": heap,
                "index_bytes": total - heap,
                "total_bytes": total,
                "bytes_per_row": total / rows if rows else nan,
                "table_bytes_per_row": heap / rows if rows else nan,
                "index_bytes_per_row": (total - heap) / rows if rows else nan,
            }
    return out


# --------------------------------------------------------------------------- report


def machine_info(server_url: str, origin: str) -> dict[str, Any]:
    with db(server_url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = {
            str(r["name"]): str(r["setting"]) + (str(r["unit"]) if r["unit"] else "")
            for r in conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name IN ('shared_buffers',"
                " 'jit', 'fsync', 'synchronous_commit', 'autovacuum', 'wal_level')"
            )
        }
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgresql": str(version["server_version"]) if version else "?",
        "server": f"{redact(server_url)} ({origin})",
        "settings": settings,
        "clock_ticks_per_s": TICK,
    }


def render(
    machine: dict[str, Any],
    args: argparse.Namespace,
    measured: Measured,
    sizes: dict[str, Any],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> tuple[str, dict[str, Any]]:
    steady, steady_small, flips, bulk, late = measured.phases
    lines: list[str] = []
    add = lines.append
    add("PostgreSQL CPU per row (bench/rows.py)")
    add(
        f"  machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, "
        f"PostgreSQL {machine['postgresql']}, storage {machine['storage_mode']}, "
        f"{machine['server']}"
    )
    add("  settings: " + ", ".join(f"{k}={v}" for k, v in sorted(machine["settings"].items())))
    add(
        f"  data: {args.devices:,} devices in {args.accounts} accounts, a day of history (a state "
        f"change per device every 4 h); load average {loads[0][0]:.2f} at the start, "
        f"{loads[1][0]:.2f} at the end (1 min)"
    )
    av = measured.autovacuum
    if av["emulated"]:
        runs = ", ".join(f"{v} {k}" for k, v in sorted(av["runs"].items())) or "none needed"
        add(f"  autovacuum off on the server; its work done by the bench between batches: {runs}")
    add("")
    add(
        f"  {'phase':37}{'batch':>6}{'rows':>9}{'events':>8}{'wall s':>8}{'PG µs/row':>11}"
        f"{'(schedstat)':>12}{'client µs/row':>15}"
    )
    for p in measured.phases:
        add(
            f"  {p.label:37}{p.batch:>6,}{p.heartbeats:>9,}{p.events:>8,}{p.wall_s:>8.1f}"
            f"{p.us(p.server_s):>11.1f}{p.us(p.server_ns / 1e9):>12.1f}{p.us(p.client_s):>15.1f}"
        )
    add("  (PG: the writer's backend's utime+stime; schedstat: its run time, same process)")
    s1, s1b = steady.us(steady.server_s), steady_small.us(steady_small.server_s)
    s2, s3, s4 = flips.us(flips.server_s), bulk.us(bulk.server_s), late.us(late.server_s)
    derived = {
        "heartbeat_row_us": s1,
        "heartbeat_row_small_batch_us": s1b,
        "state_change_us": s2,
        "state_event_extra_us": s2 - s1,
        "usage_trigger_us_per_event": s2 - s3,
        "trigger_on_over_off": s2 / s3,
        "late_heartbeat_us": s4,
        "late_event_us": late.us(late.server_s, late.events),
    }
    add("")
    add("  PostgreSQL CPU per row, derived")
    add(f"    heartbeat, no state change, batch {args.batch:>5} (1)        {s1:8.1f} µs")
    add(f"    heartbeat, no state change, batch {args.small_batch:>5} (1b)       {s1b:8.1f} µs")
    add(f"    heartbeat with a state change (2)                   {s2:8.1f} µs")
    add(f"      the state event beyond the row (2 - 1)            {s2 - s1:8.1f} µs")
    add(f"      the usage trigger alone (2 - 3)                   {s2 - s3:8.1f} µs")
    add(f"    ratio 2 / 3 (usage trigger on / off)                {s2 / s3:8.2f}x")
    add(
        f"    late heartbeat, its 2 state events included (4)     {s4:8.1f} µs "
        f"({derived['late_event_us']:.1f} per event; {late.note})"
    )
    ex = measured.explain
    add("")
    add(
        f"  One batch of {ex['batch']:,} (phase 1) under EXPLAIN ANALYZE: "
        f"{ex['execution_ms']:.1f} ms; by CTE (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(ex["cte_ms"].items(), key=lambda kv: -kv[1]))
    )
    worst = ex["worst_join"]
    if worst["rows_removed_by_join_filter"]:
        add(
            f"    worst join: {worst['node']} on {worst['join_filter']}: estimated "
            f"{worst['estimated_rows']} rows, {worst['rows_removed_by_join_filter']:,} rows "
            "compared and removed by its filter"
        )
    if flips.functions or late.functions:
        add("")
        add("  Where the triggers' time goes (pg_stat_user_functions; backend wall time)")
        for label, p in (("phases 2 + 3", flips), ("phase 4", late)):
            add(f"    {label}, per state event with the usage trigger on ({p.events:,}):")
            for name, (calls, total, own) in sorted(p.functions.items(), key=lambda kv: -kv[1][1]):
                add(
                    f"      {name:34} calls {calls:>8,}   total {total / p.events * 1e3:8.1f} µs"
                    f"   self {own / p.events * 1e3:8.1f} µs"
                )
    add("")
    add("  On disk after VACUUM (ANALYZE), over the partitions holding rows")
    for table, s in sizes.items():
        add(
            f"    {table:20}{s['rows']:>10,} rows {s['bytes_per_row']:7.1f} bytes/row "
            f"({s['table_bytes_per_row']:.1f} table + {s['index_bytes_per_row']:.1f} indexes); "
            f"{', '.join(s['partitions'])}"
        )
    data = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "load_average": {"start": loads[0], "end": loads[1]},
        "autovacuum": measured.autovacuum,
        "phases": [p.as_json() for p in measured.phases],
        "derived_us": derived,
        "explain": measured.explain,
        "disk": sizes,
    }
    return "\n".join(lines), data


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench rows",
        description="PostgreSQL CPU time per row of what the ingest writer stores (issue 11, "
        "item 5): heartbeats without a state change, state changes with the usage trigger on "
        "and off, late state changes; and bytes per row on disk. About 2 minutes by default.",
    )
    parser.add_argument(
        "--heartbeats", type=int, default=120_000,
        help="phase 1: heartbeats without a state change (default 120,000; at least 2x "
        "--devices); phase 1b writes a quarter of that in small batches",
    )  # fmt: skip
    parser.add_argument(
        "--events", type=int, default=20_000,
        help="phases 2 and 3: state-changing heartbeats, each (default 20,000)",
    )  # fmt: skip
    parser.add_argument(
        "--late", type=int, default=4_000,
        help="phase 4: late state-changing heartbeats (default 4,000)",
    )  # fmt: skip
    parser.add_argument("--devices", type=int, default=20_000, help="default 20,000")
    parser.add_argument(
        "--accounts", type=int, default=20,
        help="devices are dealt to the accounts in turn (default 20; the usage figures are "
        "kept per account and class)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, default=2000,
        help="heartbeats per write_batch (default 2,000, the worker's largest batch)",
    )  # fmt: skip
    parser.add_argument(
        "--small-batch", type=int, default=250, help="phase 1b's batch (default 250)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = (args.heartbeats, args.events, args.late, args.devices, args.accounts, args.batch)
    if min(*counts, args.small_batch) < 1:
        parser.error("every count must be at least 1")
    if args.batch > args.devices:
        parser.error("--batch must not exceed --devices (a batch's devices are distinct)")
    if args.heartbeats < 2 * args.devices:
        parser.error(
            "--heartbeats must be at least 2x --devices (a late heartbeat falls between two "
            "of phase 1's)"
        )
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server = find_server()
    name = DB_PREFIX + secrets.token_hex(4)
    load_start = os.getloadavg()
    # The run's simulated span (see Clock), ending an hour ago.
    span = (
        timedelta(minutes=1) * (args.heartbeats * 5 // 4 + args.batch)
        + CHANGE_EVERY * 2 * args.events
    ) / args.devices
    t0 = (datetime.now(UTC) - timedelta(hours=1) - span).replace(microsecond=0)
    try:
        machine = machine_info(server.url, server.origin)
        with admin(server.url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = make_conninfo(server.url, dbname=name)
        try:
            say(f"scratch database {name}; migrating")
            machine["storage_mode"] = migrate(url).mode
            say(f"{args.accounts} accounts, {args.devices:,} devices and a day of history")
            devices = build(url, args, t0, t0 + span + timedelta(hours=1))
            measured = measure(url, args, devices, t0)
            sizes = disk(url)
        finally:
            with admin(server.url) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            say(f"dropped {name}")
    except KeyboardInterrupt:
        say("interrupted; scratch database dropped")
        return 130
    finally:
        server.stop()
    text, data = render(machine, args, measured, sizes, (load_start, os.getloadavg()))
    data["finished_at"] = datetime.now(UTC).isoformat()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
