"""API read benchmark (issue 11): every read endpoint's p50/p99 under a real HTTP load generator.

    ./dev bench api [--devices 100000 --events 1000000 --duration 10 --connections 8
                     --json FILE --keep]

Builds a scratch database on DEVMETER_BENCH_DATABASE_URL (an embedded PostgreSQL if that is
unreachable) holding two accounts, a large one (``--devices``, ``--events`` state events in
the last full month) and a small one (``--small-devices``), with three months each: one
closed (``close_month``), the last full month left open (not closed: its usage is
preliminary, read from the maintained figures) and the current month up to now. Then starts
``devmeter api`` as a subprocess, signs in to the console through its form, and drives every
read endpoint of both accounts with ``wrk`` (``--connections`` connections, ``--duration``
seconds each), reading p50/p99 and requests/s from wrk's own latency histogram.

The baseline runs in the same database: the usage of the open month replayed from its events
(``get_usage(..., evidence=True)``, ``peaks`` and the old daily path ``daily_usage(load_events
(...))``), which is what every usage read did before migration 0014, against the same reads
from the maintained figures, in-process and over HTTP. Scratch databases are dropped at the
end, also on Ctrl-C or SIGTERM (``--keep`` keeps them).

Without wrk (Debian's ``wrk``; installed on first use when the bench runs as root) the load
comes from a Python asyncio closed loop, labelled so in the table: its own CPU competes with
the server's on a small machine, so its figures are not wrk's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, cast

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.close import find_server, redact
from devmeter.db import connect
from devmeter.migrate import ensure_month_partitions, migrate
from ingest.protocol import device_topic
from metering import usage_model
from metering.catalog import Catalog, load_catalog
from metering.daily import daily_usage, load_events
from metering.peak import month_bounds
from metering.peak_frame import peaks
from metering.registry import create_account
from metering.statements import (
    LATE_MARGIN,
    close_month,
    current_month,
    get_usage,
    sweep_racing,
    usage_document,
)

REPO = Path(__file__).resolve().parent.parent
DB_PREFIX = "devmeter_bench_api_"

# Targets from issue 11.
TARGET_API_P99_MS = 50.0
TARGET_CONSOLE_P99_MS = 100.0
TARGET_SPEEDUP = 100.0
#: The open-month usage read of the 100,000-device account before migration 0014 (issue 11).
ISSUE_BASELINE_S = 1.0

#: wrk's summary as one JSON line (latencies in microseconds), so nothing parses its table.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def say(message: str) -> None:
    print(f"bench api: {message}", file=sys.stderr, flush=True)


def db(url: str) -> psycopg.Connection[dict[str, Any]]:
    """devmeter.db.connect in autocommit, as the API's pool hands connections out."""
    return cast("psycopg.Connection[dict[str, Any]]", connect(url, autocommit=True))


def previous(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    year, number = (year - 1, 12) if number == 1 else (year, number - 1)
    return f"{year:04d}-{number:02d}"


# --------------------------------------------------------------------------- load average


class LoadWatch:
    """The 1-minute load average once a second: the machine is shared, and a p99 measured
    beside a test suite is not one measured alone."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)

    def __enter__(self) -> LoadWatch:
        self.samples.append((time.monotonic(), os.getloadavg()[0]))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((time.monotonic(), os.getloadavg()[0]))

    def span(self, start: float, end: float) -> tuple[float, float]:
        """(mean, max) of the samples in [start, end]."""
        inside = [s[1] for s in self.samples if start <= s[0] <= end + 1] or [os.getloadavg()[0]]
        return statistics.fmean(inside), max(inside)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Months:
    timezone: str
    closed: str
    #: The last full month, not closed: usage preliminary, read from the maintained figures.
    open_full: str
    current: str
    now: datetime


@dataclass
class Account:
    label: str
    ref: str
    account_id: int
    key: str
    devices: int
    events: int
    #: A device in the middle of the fleet, for /v1/devices/{id} and its events.
    device_id: str
    cookie: str = ""


def months_now(tz: str) -> Months:
    now = datetime.now(UTC)
    current = current_month(tz, now)
    open_full = previous(current)
    return Months(tz, previous(open_full), open_full, current, now)


def generate(
    url: str,
    catalog: Catalog,
    months: Months,
    *,
    label: str,
    ref: str,
    devices: int,
    events: int,
    seed: float,
) -> Account:
    """One account with ``devices`` devices and ``events`` state flips in the open full month.

    Devices register in the 30 days before the closed month (one 'active' registration event
    each); the closed month gets a tenth of ``events`` and the current month as many as its
    elapsed share of a month at the open month's rate. Flips pick a device at random and
    alternate active/inactive per device, as close.py's do. Made in SQL with the usage trigger
    off, then the figures rebuilt set-based, as the importer does (a million events through the
    per-event trigger would take minutes and say nothing about reads).
    """
    closed_lo, closed_hi = month_bounds(months.closed, months.timezone)
    open_lo, open_hi = month_bounds(months.open_full, months.timezone)
    current_lo, _ = month_bounds(months.current, months.timezone)
    # Up to a minute ago: the importer and the API refuse events from the future.
    current_hi = max(current_lo, months.now - timedelta(minutes=1))
    share = (current_hi - current_lo) / (open_hi - open_lo)
    windows = [
        (closed_lo, closed_hi, events // 10),
        (open_lo, open_hi, events),
        (current_lo, current_hi, round(events * share)),
    ]
    registered_from = closed_lo - timedelta(days=30)
    with db(url) as conn:
        with conn.transaction():
            created = create_account(
                conn,
                catalog,
                ref=ref,
                name=f"Bench {label}",
                plan="standard",
                country="JP",
                timezone=months.timezone,
                signed_up_on=registered_from.date() - timedelta(days=1),
            )
        account_id = created.account.id
        conn.execute("SET max_parallel_workers_per_gather = 0")
        conn.execute("SET work_mem = '512MB'")
        conn.execute("SELECT set_config('devmeter.usage_bulk', 'on', false)")
        conn.execute("SELECT setseed(%s)", (seed,))
        conn.execute("DROP TABLE IF EXISTS bench_devices")
        conn.execute(
            """
            CREATE TEMP TABLE bench_devices AS
            SELECT n, format('%%s-%%s', %(prefix)s::text, lpad(n::text, 7, '0')) AS id,
                   %(account_id)s::bigint AS account_id,
                   CASE WHEN n %% 10 < 6 THEN 'lte-m' WHEN n %% 10 < 9 THEN 'wifi'
                        ELSE 'gateway' END AS device_class,
                   date_trunc('second', %(lo)s::timestamptz + interval '30 days' * random())
                       AS registered_at
            FROM generate_series(1, %(devices)s) n
            """,
            {"prefix": label, "account_id": account_id, "lo": registered_from, "devices": devices},
        )
        conn.execute("CREATE UNIQUE INDEX ON bench_devices (n)")
        ensure_partitions(conn, registered_from, months.now + timedelta(days=1))
        # ORDER BY time: ids follow event time, as for events ingested live (D3's tie-break).
        conn.execute(
            """
            INSERT INTO device_state_events
                (time, device_id, account_id, device_class, state, source, received_at)
            WITH w (lo, hi, k) AS (
                SELECT * FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[],
                                     %(ks)s::int[])
            ),
            picks AS MATERIALIZED (
                SELECT 1 + floor(random() * %(devices)s)::int AS n,
                       date_trunc('second', w.lo + random() * (w.hi - w.lo)) AS time
                FROM w CROSS JOIN LATERAL generate_series(1, w.k)
            ),
            raw AS (
                SELECT id AS device_id, account_id, device_class, registered_at AS time, 0 AS k
                FROM bench_devices
                UNION ALL
                SELECT b.id, b.account_id, b.device_class, p.time, 1
                FROM picks p JOIN bench_devices b USING (n)
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
            {
                "los": [w[0] for w in windows],
                "his": [w[1] for w in windows],
                "ks": [w[2] for w in windows],
                "devices": devices,
            },
        )
        conn.execute(
            """
            INSERT INTO devices (id, account_id, device_class, key_prefix, key_hash,
                                 registered_at, state, state_at, last_seen_at)
            SELECT b.id, b.account_id, b.device_class, 'dmk_' || left(encode(h.hash, 'hex'), 8),
                   h.hash, b.registered_at, l.state, l.time, l.time
            FROM bench_devices b
            CROSS JOIN LATERAL (
                SELECT sha256(convert_to('devmeter-bench-api:' || b.id, 'UTF8')) AS hash
            ) h
            CROSS JOIN LATERAL (
                SELECT state, time FROM device_state_events e
                WHERE e.account_id = b.account_id AND e.device_id = b.id
                ORDER BY time DESC, id DESC LIMIT 1
            ) l
            ORDER BY b.n
            """
        )
        # Refused heartbeats about the account's own devices, for GET /v1/rejections: one per
        # ten devices over the last 30 days, a few reasons.
        conn.execute(
            """
            INSERT INTO rejected_heartbeats
                (received_at, topic, reason, detail, payload, account_id, device_id)
            SELECT %(now)s::timestamptz - interval '30 days' * random(), t.topic,
                   (ARRAY['schema', 'malformed_json', 'ts_in_future'])[1 + (g %% 3)],
                   'generated by bench/api.py', convert_to('{"ts": "x"}', 'UTF8'),
                   %(account_id)s, t.device_id
            FROM generate_series(1, %(count)s) g
            CROSS JOIN LATERAL (
                SELECT id AS device_id, format(%(topic)s::text, id) AS topic
                FROM bench_devices WHERE n = 1 + (g * 7919) %% %(devices)s
            ) t
            """,
            {
                "now": months.now,
                "account_id": account_id,
                "count": max(devices // 10, 5),
                "devices": devices,
                "topic": device_topic(ref, "%s"),
            },
        )
        conn.execute("SELECT devmeter_usage_rebuild(%s)", (account_id,))
        row = conn.execute(
            "SELECT count(*) AS n FROM device_state_events WHERE account_id = %s", (account_id,)
        ).fetchone()
        middle = conn.execute(
            "SELECT id FROM bench_devices WHERE n = %s", (max(devices // 2, 1),)
        ).fetchone()
    assert row is not None
    assert middle is not None
    key = created.api_key
    return Account(label, ref, account_id, key, devices, int(row["n"]), str(middle["id"]))


def ensure_partitions(conn: psycopg.Connection[dict[str, Any]], lo: datetime, hi: datetime) -> None:
    """Plain storage: migrate() makes partitions around today only; the data go further back."""
    mode = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS ts"
    ).fetchone()
    if mode is None or not mode["ts"]:
        ensure_month_partitions(cast("psycopg.Connection[dict[str, object]]", conn), lo, hi)


def close_the_closed_month(url: str, catalog: Catalog, months: Months) -> None:
    report = close_month(lambda: connect(url), catalog, months.closed, now=months.now)
    if report.failed or len(report.closed) != 2:
        raise SystemExit(f"closing {months.closed} failed: {report}")
    # As the scheduler does once the close's margin has passed (an hour in production; the
    # bench measures reads as they are for the rest of the month, not in that first hour).
    with connect(url) as conn:
        sweep_racing(conn, now=datetime.now(UTC) + LATE_MARGIN + timedelta(minutes=1))


# --------------------------------------------------------------------------- the server


@dataclass
class ApiServer:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """The server's user + system CPU so far: its process and its workers (children)."""
        pids = [self.process.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def api_server(url: str, work: Path, workers: int = 1) -> Iterator[ApiServer]:
    """``devmeter api`` as production starts it: its own process, the service role's
    connections (derived from the owner URL, as every command but migrate does)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMETER_")}
    env.update(
        DEVMETER_DATABASE_URL=url,
        DEVMETER_ADMIN_TOKEN=secrets.token_urlsafe(24),
        DEVMETER_CONSOLE_SECRET=secrets.token_urlsafe(24),
        DEVMETER_DATA_DIR=str(work / "data"),
        DEVMETER_ENV="development",
    )
    if password := os.environ.get("DEVMETER_SERVICE_PASSWORD"):
        env["DEVMETER_SERVICE_PASSWORD"] = password
    log = work / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devmeter",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    server = ApiServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"devmeter api exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.base + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"devmeter api not ready in 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def console_cookie(base: str, key: str) -> str:
    """Sign in through the console's form, as a browser does; returns the session cookie."""
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
        form = client.get("/console/sign-in")
        token = form.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        signed = client.post("/console/sign-in", data={"key": key, "csrf_token": token})
        if signed.status_code != 303:
            raise SystemExit(f"console sign-in: {signed.status_code} {signed.text[:300]}")
        cookie = client.cookies.get("devmeter_console")
    if not cookie:
        raise SystemExit("console sign-in set no session cookie")
    return f"devmeter_console={cookie}"


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    non_2xx: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    say("installing Debian's wrk (apt-get install -y wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)
    return shutil.which("wrk")


def run_wrk(
    wrk: str, script: Path, url: str, headers: dict[str, str], connections: int, seconds: float
) -> Load:
    command = [
        wrk,
        f"-t{min(connections, 2)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*command, url], capture_output=True, text=True, check=False, timeout=seconds + 60
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {done.stdout[-500:]} {done.stderr[-500:]}")
    s = json.loads(line.removeprefix("WRKJSON "))
    return Load(
        requests=s["requests"],
        seconds=s["duration_us"] / 1e6,
        p50_ms=s["p50_us"] / 1000,
        p90_ms=s["p90_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        max_ms=s["max_us"] / 1000,
        errors=s["connect"] + s["read"] + s["write"] + s["timeout"],
        non_2xx=s["status"],
    )


def run_python_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> Load:
    """The fall-back: ``connections`` asyncio loops on httpx, each sending its next request
    when the previous one is answered (a closed loop, as wrk's)."""

    async def main() -> Load:
        latencies: list[float] = []
        errors = non_2xx = 0
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:
            started = time.perf_counter()
            deadline = started + seconds

            async def loop() -> None:
                nonlocal errors, non_2xx
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    try:
                        response = await client.get(url)
                    except httpx.HTTPError:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t0)
                    if not 200 <= response.status_code < 300:
                        non_2xx += 1

            await asyncio.gather(*(loop() for _ in range(connections)))
            elapsed = time.perf_counter() - started
        ordered = sorted(latencies) or [0.0]

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

        return Load(
            len(latencies), elapsed, pct(50), pct(90), pct(99), ordered[-1] * 1000, errors, non_2xx
        )

    return asyncio.run(main())


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    console: bool = False

    @property
    def target_ms(self) -> float:
        return TARGET_CONSOLE_P99_MS if self.console else TARGET_API_P99_MS


def endpoints(months: Months, device_id: str) -> list[Endpoint]:
    c, o, x = months.current, months.open_full, months.closed
    return [
        Endpoint("GET /v1/usage (current month)", "/v1/usage"),
        Endpoint(f"GET /v1/usage?month={o} (open, full)", f"/v1/usage?month={o}"),
        Endpoint(f"GET /v1/usage?month={x} (closed)", f"/v1/usage?month={x}"),
        Endpoint("GET /v1/usage/daily (current month)", "/v1/usage/daily"),
        Endpoint(f"GET /v1/usage/daily?month={o}", f"/v1/usage/daily?month={o}"),
        Endpoint("GET /v1/statements", "/v1/statements"),
        Endpoint(f"GET /v1/statements/{x} (final)", f"/v1/statements/{x}"),
        Endpoint(f"GET /v1/statements/{o} (preliminary)", f"/v1/statements/{o}"),
        Endpoint(f"GET /v1/statements/{c} (preliminary)", f"/v1/statements/{c}"),
        Endpoint("GET /v1/devices?limit=50", "/v1/devices?limit=50"),
        Endpoint("GET /v1/devices/{id}", f"/v1/devices/{device_id}"),
        Endpoint("GET /v1/devices/{id}/events", f"/v1/devices/{device_id}/events"),
        Endpoint("GET /v1/rejections", "/v1/rejections"),
        Endpoint("GET /console/usage (current month)", "/console/usage", console=True),
        Endpoint(f"GET /console/usage?month={o}", f"/console/usage?month={o}", console=True),
    ]


@dataclass
class Measured:
    endpoint: str
    account: str
    target_ms: float
    load: Load
    bytes: int
    server_cpu_ms_per_request: float
    load_average_mean: float
    load_average_max: float

    @property
    def met(self) -> bool:
        ok = self.load.errors == 0 and self.load.non_2xx == 0
        return ok and self.load.p99_ms < self.target_ms


def measure_all(
    server: ApiServer,
    accounts: list[Account],
    months: Months,
    args: argparse.Namespace,
    wrk: str | None,
    work: Path,
    watch: LoadWatch,
) -> list[Measured]:
    script = work / "summary.lua"
    script.write_text(WRK_SCRIPT)
    results: list[Measured] = []
    for account in accounts:
        for endpoint in endpoints(months, account.device_id):
            headers = (
                {"Cookie": account.cookie}
                if endpoint.console
                else {"Authorization": f"Bearer {account.key}"}
            )
            url = server.base + endpoint.path
            # One checked request first: a 4xx under load would otherwise be timed as a read.
            check = httpx.get(url, headers=headers, timeout=30, follow_redirects=False)
            if check.status_code != 200:
                raise SystemExit(
                    f"{endpoint.path} ({account.label}): {check.status_code} {check.text[:300]}"
                )
            cpu0, t0 = server.cpu_seconds(), time.monotonic()
            if wrk:
                load = run_wrk(wrk, script, url, headers, args.connections, args.duration)
            else:
                load = run_python_load(url, headers, args.connections, args.duration)
            cpu = server.cpu_seconds() - cpu0
            mean, peak = watch.span(t0, time.monotonic())
            measured = Measured(
                endpoint.name,
                account.label,
                endpoint.target_ms,
                load,
                len(check.content),
                cpu * 1000 / load.requests if load.requests else 0.0,
                mean,
                peak,
            )
            results.append(measured)
            say(
                f"  {account.label:6} {endpoint.name:48} p50 {load.p50_ms:7.1f} ms  p99 "
                f"{load.p99_ms:7.1f} ms  {load.rate:7.0f} req/s  load {mean:.1f}"
            )
    return results


# --------------------------------------------------------------------------- baseline


@dataclass
class Timing:
    label: str
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def timed(label: str, repeat: int, action: Callable[[], object]) -> Timing:
    runs: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        runs.append(time.perf_counter() - started)
    return Timing(label, runs)


def baseline(
    url: str, catalog: Catalog, account: Account, months: Months, repeat: int
) -> list[Timing]:
    """The replay (every usage read before 0014) against the maintained figures, in-process,
    on one connection, for the open full month and the current month."""
    out: list[Timing] = []
    with db(url) as conn:
        for label, month in (
            ("open full month", months.open_full),
            ("current month", months.current),
        ):
            say(f"  baseline: {label} {month}, replaying ...")
            out += month_baseline(conn, catalog, account, label, month, months.timezone, repeat)
            # The API answers the same figures: the read is a new path, not a new result.
            now = datetime.now(UTC)
            replayed = get_usage(conn, catalog, account.ref, month, now=now)
            read = get_usage(conn, catalog, account.ref, month, now=now, evidence=False)
            if {c: p.peak for c, p in replayed.classes.items()} != {
                c: p.peak for c, p in read.classes.items()
            }:
                raise SystemExit(f"{month}: maintained figures disagree with the replay")
    return out


def month_baseline(
    conn: psycopg.Connection[dict[str, Any]],
    catalog: Catalog,
    account: Account,
    label: str,
    month: str,
    tz: str,
    repeat: int,
) -> list[Timing]:
    start, end = month_bounds(month, tz)
    now = datetime.now(UTC)

    def replay() -> object:
        return get_usage(conn, catalog, account.ref, month, now=now)

    def replay_peaks() -> object:
        return peaks(conn, account.account_id, start, end)

    def old_daily() -> object:
        events = load_events(conn, account.account_id, start, end)
        return daily_usage(events, start, end, tz, until=now)

    def read() -> object:
        return get_usage(conn, catalog, account.ref, month, now=now, evidence=False)

    def read_daily() -> object:
        return usage_model.daily(conn, account.account_id, start, end, tz, until=now)

    # The reads take milliseconds: ten times the runs, so the median is not one scheduler slice.
    return [
        timed(f"{label}: get_usage(evidence=True) [replay, baseline]", repeat, replay),
        timed(f"{label}: peaks() alone [replay]", repeat, replay_peaks),
        timed(f"{label}: daily_usage(load_events()) [old daily]", repeat, old_daily),
        timed(f"{label}: get_usage(evidence=False) [read]", repeat * 10, read),
        timed(f"{label}: usage_model.daily [read]", repeat * 10, read_daily),
    ]


# --------------------------------------------------------------------------- diagnosis


@dataclass
class Profiled:
    label: str
    calls: int
    wall_ms_per_call: float
    #: Of that, time inside psycopg's execute/fetch (the database and the wire), per call.
    database_ms_per_call: float
    top: str


@dataclass
class Explained:
    label: str
    execution_ms: float
    rows: int
    plan: str


def profile_reads(
    url: str, catalog: Catalog, account: Account, months: Months, calls: int = 10
) -> list[Profiled]:
    """cProfile of what the slow handlers call, in-process (the server's worker threads are
    out of a profiler's reach): usage and daily of the open full month, usage of the closed."""
    tz = months.timezone
    start, end = month_bounds(months.open_full, tz)
    out: list[Profiled] = []
    with db(url) as conn:
        now = datetime.now(UTC)
        actions: list[tuple[str, Callable[[], object]]] = [
            (
                f"usage {months.open_full} (open, full)",
                lambda: usage_document(
                    get_usage(conn, catalog, account.ref, months.open_full, now=now, evidence=False)
                ),
            ),
            (
                f"daily {months.open_full}",
                lambda: usage_model.daily(conn, account.account_id, start, end, tz, until=now),
            ),
            (
                f"usage {months.closed} (closed)",
                lambda: usage_document(
                    get_usage(conn, catalog, account.ref, months.closed, now=now, evidence=False)
                ),
            ),
        ]
        for label, action in actions:
            action()  # warm: plans cached, pages in shared buffers
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            for _ in range(calls):
                action()
            profiler.disable()
            wall = (time.perf_counter() - started) / calls
            stats = pstats.Stats(profiler)
            raw: dict[tuple[str, int, str], tuple[Any, ...]] = getattr(stats, "stats", {})
            database = sum(
                value[3]
                for (filename, _line, name), value in raw.items()
                if "psycopg" in filename
                and filename.endswith("cursor.py")
                and name in ("execute", "fetchall", "fetchone", "__iter__")
            )
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
            site = str(Path(psycopg.__file__).parent.parent) + "/"
            top = "\n".join(
                line.replace(site, "").replace(str(REPO) + "/", "")
                for line in text.getvalue().splitlines()
                if line.strip() and "function calls" not in line and "List reduced" not in line
            )
            out.append(Profiled(label, calls, wall * 1000, database * 1000 / calls, top))
    return out


def explain_reads(url: str, account: Account, months: Months) -> list[Explained]:
    """EXPLAIN ANALYZE of metering.usage_model's queries for the open full month: the SQL every
    usage read runs (read from the module so the plan is of the code measured), and the fold of
    the quarter hours that reads in a zone other than the account's fall back to."""
    start, end = month_bounds(months.open_full, months.timezone)
    params = {
        "account_id": account.account_id,
        "start": start,
        "end": end,
        "instants": [start],
        "tz": months.timezone,
        "classes": ["lte-m", "wifi", "gateway"],
    }
    out: list[Explained] = []
    with db(url) as conn:
        for label, query in (
            ("usage_model._CLASSES (classes, opening count)", usage_model._CLASSES),
            ("usage_model._KEPT_DAYS (the month's kept days)", usage_model._KEPT_DAYS),
            ("usage_model._DAYS (buckets by local day: other zones)", usage_model._DAYS),
            ("usage_model._STEPS_AT (steps at day starts)", usage_model._STEPS_AT),
        ):
            conn.execute(query, params).fetchall()
            row = conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(sql.SQL(query)),
                params,
            ).fetchone()
            assert row is not None
            doc = next(iter(row.values()))[0]
            plan = doc["Plan"]
            lines = [
                f"{plan['Node Type']} rows={plan.get('Actual Rows')} "
                f"time={plan.get('Actual Total Time')} ms"
            ]
            lines += [
                f"  {child['Node Type']} {child.get('Index Name', child.get('Relation Name', ''))} "
                f"rows={child.get('Actual Rows')} time={child.get('Actual Total Time')} ms"
                for child in plan.get("Plans", [])
            ]
            ms, rows = float(doc["Execution Time"]), int(plan["Actual Rows"])
            out.append(Explained(label, ms, rows, "\n".join(lines)))
    return out


# --------------------------------------------------------------------------- report


def machine_info(server_url: str, origin: str) -> dict[str, Any]:
    with db(server_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
    code = {
        name: hashlib.sha256((REPO / name).read_bytes()).hexdigest()[:12]
        for name in ("metering/usage_model.py", "metering/statements.py", "api/routes/usage.py")
    }
    return {
        "code_sha256": code,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": str(version["server_version"]) if version else "?",
        "server": f"{redact(server_url)} ({origin})",
        "loadavg_at_start": os.getloadavg(),
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def render(
    machine: dict[str, Any],
    accounts: list[Account],
    months: Months,
    results: list[Measured],
    timings: list[Timing],
    generator: str,
    args: argparse.Namespace,
    run_load: tuple[float, float],
) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    add = lines.append
    add("API read benchmark (bench/api.py)")
    add(
        f"  machine: {machine['nproc']} CPUs, Python {machine['python']}, PostgreSQL "
        f"{machine['postgresql']}, {machine['server']}"
    )
    add("  code: " + ", ".join(f"{k} {v}" for k, v in machine["code_sha256"].items()))
    add(
        f"  load generator: {generator}, {args.connections} connections, {args.duration:g} s "
        "per endpoint"
    )
    add(
        f"  months ({months.timezone}): closed {months.closed}, open full {months.open_full}, "
        f"current {months.current} (to {months.now:%Y-%m-%d %H:%M} UTC)"
    )
    for a in accounts:
        add(f"  account {a.label}: {a.devices:,} devices, {a.events:,} state events in all")
    add(
        f"  load average: {machine['loadavg_at_start'][0]:.2f} at start; during the load runs "
        f"mean {run_load[0]:.2f}, max {run_load[1]:.2f}"
    )
    add("")
    add(
        f"  {'endpoint':48} {'account':7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} "
        f"{'cpu ms/req':>10} {'target':>8}  met"
    )
    for r in results:
        flag = met(r.met)
        if r.load.errors or r.load.non_2xx:
            flag += f" ({r.load.errors} errors, {r.load.non_2xx} non-2xx)"
        add(
            f"  {r.endpoint:48} {r.account:7} {r.load.p50_ms:8.1f} {r.load.p99_ms:8.1f} "
            f"{r.load.rate:7.0f} {r.server_cpu_ms_per_request:10.1f} "
            f"{f'<{r.target_ms:.0f}':>8}  {flag}"
        )
    add("")
    add("Baseline, in-process on one connection, large account (seconds: median, best)")
    for t in timings:
        add(f"  {t.label:62} {t.median:8.4f} {t.best:8.4f}  (x{len(t.runs)})")

    def timing(prefix: str, kind: str) -> Timing:
        return next(t for t in timings if t.label.startswith(prefix) and kind in t.label)

    def http(account: str, name_start: str) -> Measured | None:
        return next(
            (r for r in results if r.account == account and r.endpoint.startswith(name_start)),
            None,
        )

    large = accounts[0].label
    add("")
    add("Ratios (replay / read)")
    ratios: dict[str, float] = {}
    for prefix, month in (("open full month", months.open_full), ("current month", months.current)):
        replay = timing(prefix, "get_usage(evidence=True)").median
        read = timing(prefix, "get_usage(evidence=False)").median
        ratios[f"{prefix}: usage in-process"] = replay / read
        add(
            f"  {prefix} usage, in-process: {replay:.3f} s / {read * 1000:.2f} ms = "
            f"{replay / read:,.0f}x"
        )
        name = f"GET /v1/usage?month={month}" if prefix.startswith("open") else "GET /v1/usage (cur"
        over_http = http(large, name)
        if over_http is not None:
            ratio = replay / (over_http.load.p50_ms / 1000)
            ratios[f"{prefix}: usage over HTTP p50"] = ratio
            add(
                f"  {prefix} usage, HTTP p50: {replay:.3f} s / {over_http.load.p50_ms:.1f} ms = "
                f"{ratio:,.0f}x"
            )
        old_daily = timing(prefix, "daily_usage").median
        new_daily = timing(prefix, "usage_model.daily").median
        ratios[f"{prefix}: daily in-process"] = old_daily / new_daily
        add(
            f"  {prefix} daily, in-process: {old_daily:.3f} s / {new_daily * 1000:.2f} ms = "
            f"{old_daily / new_daily:,.0f}x"
        )
    add("")
    add("Targets (issue 11)")
    api_ok = all(r.met for r in results if r.target_ms == TARGET_API_P99_MS)
    console_ok = all(r.met for r in results if r.target_ms == TARGET_CONSOLE_P99_MS)
    worst_api = max(
        (r for r in results if r.target_ms == TARGET_API_P99_MS), key=lambda r: r.load.p99_ms
    )
    worst_console = max(
        (r for r in results if r.target_ms == TARGET_CONSOLE_P99_MS), key=lambda r: r.load.p99_ms
    )
    add(
        f"  every read endpoint p99 < {TARGET_API_P99_MS:.0f} ms, both accounts: worst "
        f"{worst_api.load.p99_ms:.1f} ms ({worst_api.endpoint}, {worst_api.account})  -> "
        f"{met(api_ok)}"
    )
    add(
        f"  console usage page p99 < {TARGET_CONSOLE_P99_MS:.0f} ms: worst "
        f"{worst_console.load.p99_ms:.1f} ms ({worst_console.endpoint}, "
        f"{worst_console.account})  -> {met(console_ok)}"
    )
    in_run = ratios.get("open full month: usage over HTTP p50", 0.0)
    open_http = http(large, f"GET /v1/usage?month={months.open_full}")
    vs_issue = ISSUE_BASELINE_S / (open_http.load.p50_ms / 1000) if open_http else 0.0
    add(
        f"  open-month usage >= {TARGET_SPEEDUP:.0f}x faster than the replay (this run, HTTP "
        f"p50): {in_run:,.0f}x  -> {met(in_run >= TARGET_SPEEDUP)}"
    )
    add(
        f"  open-month usage >= {TARGET_SPEEDUP:.0f}x faster than the issue's "
        f"{ISSUE_BASELINE_S:.1f} s (HTTP p50): {vs_issue:,.0f}x  -> "
        f"{met(vs_issue >= TARGET_SPEEDUP)}"
    )
    targets = {
        "api_p99": api_ok,
        "console_p99": console_ok,
        "speedup_in_run": in_run >= TARGET_SPEEDUP,
        "speedup_vs_issue": vs_issue >= TARGET_SPEEDUP,
    }
    data = {
        "machine": machine,
        "months": {**asdict(months), "now": months.now.isoformat()},
        "accounts": [
            {k: v for k, v in asdict(a).items() if k not in ("key", "cookie")} for a in accounts
        ],
        "generator": generator,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [{**asdict(r), "rate": r.load.rate, "met": r.met} for r in results],
        "timings": [{**asdict(t), "median": t.median, "best": t.best} for t in timings],
        "ratios": ratios,
        "targets": targets,
        "load_average_during_runs": {"mean": run_load[0], "max": run_load[1]},
    }
    return "\n".join(lines), data


def render_diagnosis(
    results: list[Measured], profiles: list[Profiled], explains: list[Explained], connections: int
) -> str:
    if not profiles and not explains:
        return ""
    lines = ["", "Diagnosis (where the time goes)"]
    add = lines.append
    # One process serves every request and its Python holds the GIL: in a closed loop each
    # connection waits behind the others, so p50 is at least about connections x CPU/request
    # divided by the cores the server's Python can use (one, plus what PostgreSQL overlaps).
    add(f"  server CPU per request x {connections} connections (queueing floor of one process):")
    for r in sorted(results, key=lambda r: -r.load.p99_ms)[:8]:
        add(
            f"    {r.endpoint:48} {r.account:6} {r.server_cpu_ms_per_request:6.1f} ms/req x "
            f"{connections} = {r.server_cpu_ms_per_request * connections:6.0f} ms  (p50 "
            f"{r.load.p50_ms:.0f}, p99 {r.load.p99_ms:.0f})"
        )
    for p in profiles:
        add(
            f"  cProfile, large account, {p.label}: {p.wall_ms_per_call:.1f} ms per call "
            f"(profiled), of which psycopg execute/fetch {p.database_ms_per_call:.1f} ms; "
            "top by own time:"
        )
        lines.extend("    " + line for line in p.top.splitlines())
    for e in explains:
        add(f"  EXPLAIN ANALYZE {e.label}: {e.execution_ms:.1f} ms, {e.rows:,} rows")
        lines.extend("    " + line for line in e.plan.splitlines())
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench api", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--devices", type=int, default=100_000, help="large account's devices")
    parser.add_argument(
        "--events",
        type=int,
        default=1_000_000,
        help="large account's state events in the open full month (the closed month gets a "
        "tenth, the current month its elapsed share)",
    )
    parser.add_argument("--small-devices", type=int, default=10, help="small account's devices")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per endpoint")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="API processes (devmeter api --workers; default: one per core, as in production)",
    )
    parser.add_argument("--timezone", default="Asia/Tokyo", help="both accounts' time zone")
    parser.add_argument("--repeat", type=int, default=3, help="baseline replays per figure")
    parser.add_argument(
        "--python-load", action="store_true", help="use the Python load generator even with wrk"
    )
    parser.add_argument(
        "--diagnose",
        choices=["auto", "always", "never"],
        default="auto",
        help="profile the slow reads and EXPLAIN ANALYZE their SQL when a target is missed "
        "(auto), always, or never",
    )
    parser.add_argument("--seed", type=float, default=0.42, help="setseed() for generation")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch database and the work folder"
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.small_devices < 1 or args.events < 0:
        parser.error("--devices and --small-devices at least 1, --events at least 0")
    if args.connections < 1 or args.duration <= 0 or args.repeat < 1:
        parser.error("--connections and --repeat at least 1, --duration positive")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM takes the same way out as Ctrl-C, so the scratch database is dropped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    wrk = None if args.python_load else find_wrk()
    generator = (
        f"wrk ({wrk}), latency from its histogram"
        if wrk
        else "PYTHON asyncio/httpx closed loop "
        + ("(--python-load)" if args.python_load else "(no wrk: apt-get install wrk)")
        + ", its CPU shares the machine with the server's: not comparable with wrk's figures"
    )
    if not wrk and not args.python_load:
        say("wrk not found and not installable here; falling back to the Python load generator")
    server = find_server()
    name = DB_PREFIX + secrets.token_hex(4)
    work = Path(tempfile.mkdtemp(prefix="devmeter-bench-api-"))
    catalog = load_catalog()
    created = False
    try:
        with LoadWatch() as watch:
            machine = machine_info(server.url, server.origin)
            with psycopg.connect(server.url, autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            created = True
            url = make_conninfo(server.url, dbname=name)
            say(f"scratch database {name}; migrating ...")
            migrate(url)
            months = months_now(args.timezone)
            accounts: list[Account] = []
            for label, devices, events in (
                ("large", args.devices, args.events),
                (
                    "small",
                    args.small_devices,
                    max(args.events * args.small_devices // args.devices, args.small_devices),
                ),
            ):
                started = time.perf_counter()
                accounts.append(
                    generate(
                        url,
                        catalog,
                        months,
                        label=label,
                        ref=f"bench-api-{label}",
                        devices=devices,
                        events=events,
                        seed=args.seed,
                    )
                )
                say(
                    f"  {label}: {devices:,} devices, {accounts[-1].events:,} events in "
                    f"{time.perf_counter() - started:.1f} s"
                )
            say(f"closing {months.closed} ...")
            close_the_closed_month(url, catalog, months)
            with db(url) as conn:
                conn.execute("VACUUM (ANALYZE)")
            say("baseline (replay) and in-process reads, large account ...")
            timings = baseline(url, catalog, accounts[0], months, args.repeat)
            say("starting devmeter api ...")
            with api_server(url, work, args.workers) as api:
                say(f"  serving at {api.base}; signing in to the console ...")
                for account in accounts:
                    account.cookie = console_cookie(api.base, account.key)
                t0 = time.monotonic()
                results = measure_all(api, accounts, months, args, wrk, work, watch)
                run_load = watch.span(t0, time.monotonic())
            profiles: list[Profiled] = []
            explains: list[Explained] = []
            replay = next(t for t in timings if "evidence=True" in t.label).median
            open_p50 = next(
                r.load.p50_ms
                for r in results
                if r.account == accounts[0].label and f"month={months.open_full}" in r.endpoint
            )
            missed = not all(r.met for r in results) or replay / (open_p50 / 1000) < TARGET_SPEEDUP
            if args.diagnose == "always" or (args.diagnose == "auto" and missed):
                # After the server stopped, so the profile has the machine to itself.
                say("diagnosing: cProfile of the slow reads, EXPLAIN ANALYZE of their SQL ...")
                profiles = profile_reads(url, catalog, accounts[0], months)
                explains = explain_reads(url, accounts[0], months)
        text, data = render(machine, accounts, months, results, timings, generator, args, run_load)
        text += render_diagnosis(results, profiles, explains, args.connections)
        data["diagnosis"] = {
            "profiles": [asdict(p) for p in profiles],
            "explains": [asdict(e) for e in explains],
        }
        data["finished_at"] = datetime.now(UTC).isoformat()
        print(text)
        if args.json:
            args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
            say(f"wrote {args.json}")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if created and not args.keep:
            with psycopg.connect(server.url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            say(f"dropped {name}")
        elif created:
            say(f"kept {name} and {work}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
