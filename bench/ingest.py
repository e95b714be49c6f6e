"""Ingest benchmark: `devmeter ingest` against a discard-only subscriber and a naive one.

Run with ``./dev bench ingest`` (``--help`` for options, ``--quick`` for a smoke run); see
bench/README.md for what each phase measures. One run measures, on the same stream:

* ceiling: a paho subscriber that counts and discards (what MQTT alone allows here);
* devmeter: `devmeter ingest` subprocesses (the production code path), one and then two on a
  shared subscription, from first publish to last row committed;
* naive: a subscriber that INSERTs and commits each message (the baseline to beat);
* latency and soak: publish-to-commit latency at half the one-worker rate, worker memory.

Publishers, broker, consumers and PostgreSQL share the machine's cores, as the issue asks, so
each phase also reports the CPU each party used and the CPU of processes that are not ours
(other people's tests): that tells a slow run from a busy machine.

The broker is a private Mosquitto (``start_broker``), never the machine's own on 1883: that
one keeps max_queued_messages at 1000 and drops what a subscriber that falls behind has not
taken yet, which would turn a throughput run into a loss test.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import os
import platform
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import sql
from psycopg.rows import dict_row

from devmeter.config import Settings
from devmeter.embedded import EmbeddedServerError, start_broker, start_postgres
from devmeter.migrate import migrate
from ingest.mqtt import parse_mqtt_url
from ingest.simulate import Fleet, Publisher, Traffic, ensure_fleet, fleet_ids, run_traffic
from metering.catalog import load_catalog

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SUBSCRIPTION = "devmeter/#"
ACCOUNT = "bench"
PREFIX = "bench"
PHASES = ("ceiling", "devmeter", "naive", "latency", "two", "soak")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KIB_PER_MIB = 1024.0
#: Latency tracing: every n-th message, how often the poller asks which are committed, and
#: how many of the oldest outstanding it asks about at once. The poll is PostgreSQL work on
#: the same cores as the worker's (every 10th message with no cap cost ~0.4 core), so it is
#: kept to about 1-2 ms a poll: a batch commit resolves fewer traced messages than the cap.
_PROBE_EVERY = 25
_PROBE_POLL_S = 0.02
_PROBE_CAP = 48
_RSS_EVERY_S = 5.0
_FINISH_WAIT_S = 3600.0
#: Publishers wait while they are this many messages ahead of the consumer: the private broker
#: queues at most 100,000 per session (beyond the in-flight ones) and drops the rest.
_BACKLOG = 50_000
_CHILDREN_PER_MESSAGE = 50

# Targets from the issue.
TARGET_OF_CEILING = 0.70
TARGET_OVER_NAIVE = 15.0
TARGET_P99_S = 1.0
#: "Flat": the worker's RSS grows by at most this share over the soak's second half.
TARGET_RSS_GROWTH = 0.05

_T0 = time.monotonic()


def say(message: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {message}\n")
    sys.stderr.flush()


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    messages: int
    naive_messages: int
    naive_seconds: float
    publishers: int
    window: int
    devices: int
    gateways: int
    gateway_share: float
    latency_seconds: float
    soak_seconds: float
    repeat: int
    phases: tuple[str, ...]
    half_rate: float | None
    worker_env: dict[str, str]
    json_path: Path | None
    profile: bool
    py_spy: str | None
    keep: bool
    embedded_postgres: bool
    database_url: str
    quick: bool


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="./dev bench ingest",
        description="Ingest throughput and latency against a discard-only and a naive subscriber. "
        "PostgreSQL: DEVMETER_BENCH_DATABASE_URL (default the local server, else an embedded one). "
        "--source jetstream runs the NATS JetStream bench instead (its own --help).",
    )
    add = parser.add_argument
    add("--messages", type=int, help="messages per throughput phase (200000; quick 20000)")
    add("--naive-messages", type=int, help="messages for the naive phase (20000; quick 2000)")
    add("--naive-seconds", type=float, help="end the naive phase after this long (60; quick 15)")
    add("--publishers", type=int, default=2, help="publisher processes (2)")
    # Not Publisher's default of 1000: paho scans every in-flight message on each PUBACK
    # (Client._update_inflight), which at 1000 in flight doubles the publishers' CPU per
    # message; 100 keeps localhost round trips hidden at a fraction of the cost.
    add("--window", type=int, default=100, help="unacknowledged messages per publisher (100)")
    add("--devices", type=int, help="devices in the fleet (10000; quick 2000)")
    add("--gateways", type=int, help="gateways (100; quick 20)")
    add("--gateway-share", type=float, default=0.3, help="share of devices behind gateways (0.3)")
    add("--latency-seconds", type=float, help="latency phase length (30; quick 10)")
    add("--soak-seconds", type=float, help="soak phase length (300; quick 30)")
    add("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)}")
    add(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the throughput phases; each figure is the best of its runs (1)",
    )
    add("--half-rate", type=float, help="msg/s for latency and soak when devmeter is not run")
    add(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for `devmeter ingest`, e.g. DEVMETER_INGEST_BATCH_SIZE=5000",
    )
    add("--json", type=Path, dest="json_path", metavar="FILE", help="also write results here")
    add(
        "--profile",
        action="store_true",
        help="add a one-worker phase sampled by py-spy and summarise where the worker's time goes",
    )
    add("--py-spy", metavar="PATH", help="py-spy executable (default: py-spy on PATH)")
    add("--keep", action="store_true", help="keep the work folder (worker and broker logs)")
    add(
        "--embedded-postgres",
        action="store_true",
        help="use a private embedded PostgreSQL even if DEVMETER_BENCH_DATABASE_URL is reachable",
    )
    add("--quick", action="store_true", help="a ~1-minute smoke run: small fleet, N and soak")
    args = parser.parse_args(argv)

    quick = bool(args.quick)

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    phases = tuple(p.strip() for p in str(args.phases).split(",") if p.strip())
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    if {"latency", "soak"} & set(phases) and "devmeter" not in phases and not args.half_rate:
        parser.error("latency and soak run at half the devmeter rate: run devmeter or --half-rate")
    worker_env: dict[str, str] = {}
    for item in args.worker_env:
        key, sep, value = str(item).partition("=")
        if not sep or not key.startswith("DEVMETER_"):
            parser.error(f"--worker-env wants DEVMETER_NAME=VALUE, got {item!r}")
        worker_env[key] = value
    if args.publishers < 1:
        parser.error("--publishers must be at least 1")
    py_spy = args.py_spy or shutil.which("py-spy")
    if args.profile and not py_spy:
        parser.error(
            "--profile needs py-spy (not a project dependency): e.g. "
            "`python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy`, "
            "then --py-spy /tmp/pyspy/bin/py-spy"
        )
    return Options(
        messages=pick(args.messages, 200_000, 20_000),
        naive_messages=pick(args.naive_messages, 20_000, 2_000),
        naive_seconds=pick(args.naive_seconds, 60.0, 15.0),
        publishers=args.publishers,
        window=args.window,
        devices=pick(args.devices, 10_000, 2_000),
        gateways=pick(args.gateways, 100, 20),
        gateway_share=args.gateway_share,
        latency_seconds=pick(args.latency_seconds, 30.0, 10.0),
        soak_seconds=pick(args.soak_seconds, 300.0, 30.0),
        repeat=max(1, args.repeat),
        phases=phases,
        half_rate=args.half_rate,
        worker_env=worker_env,
        json_path=args.json_path,
        profile=bool(args.profile),
        py_spy=py_spy,
        keep=bool(args.keep or args.profile),
        embedded_postgres=bool(args.embedded_postgres),
        database_url=os.environ.get("DEVMETER_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        quick=quick,
    )


# --------------------------------------------------------------------------- child processes
#
# Publishers and the two reference subscribers are processes of their own, spawned so that
# they inherit no threads or connections: in this process they would share one GIL with the
# poller, and the figures would measure that contention.


@dataclass(frozen=True)
class FleetSpec:
    devices: int
    gateways: int
    gateway_share: float

    def fleet(self) -> Fleet:
        gateway_ids, sims = fleet_ids(PREFIX, self.devices, self.gateways, self.gateway_share)
        return Fleet(tuple(sims), tuple(gateway_ids), ACCOUNT)

    def heartbeats_per_message(self) -> float:
        """Over whole rounds of the fleet: each direct device speaks once, each gateway once
        per chunk of up to ``Traffic``'s 50 children, and every device is heard once."""
        fleet = self.fleet()
        messages = len(fleet.direct()) + sum(
            max(1, math.ceil(len(kids) / _CHILDREN_PER_MESSAGE))
            for kids in fleet.children().values()
        )
        return (len(fleet.devices) + len(fleet.gateways)) / messages

    def traffic(self, index: int, total: int, **kwargs: Any) -> Traffic:
        # One seed per shard: the parent replays the same stream to know the expected rows.
        return Traffic(
            self.fleet(),
            shard=(index, total),
            bad_share=0.0,
            seed=index,
            children_per_message=_CHILDREN_PER_MESSAGE,
            **kwargs,
        )


@dataclass(frozen=True)
class PublishJob:
    url: str
    fleet: FleetSpec
    index: int
    total: int
    count: int | None
    rate: float
    seconds: float | None
    window: int
    #: Hand every n-th message's (device, ts) to the latency poller; 0: none.
    probe_every: int
    client_id: str


def _child_setup() -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _publish_child(
    name: str,
    job: PublishJob,
    go: multiprocessing.synchronize.Event,
    consumed: Any,
    probes: multiprocessing.Queue[tuple[str, int | str]] | None,
    out: multiprocessing.Queue[tuple[str, str, Any]],
    finish: multiprocessing.synchronize.Event,
) -> None:
    _child_setup()
    try:
        traffic = job.fleet.traffic(job.index, job.total)
        publisher = Publisher(job.url, client_id=job.client_id, window=job.window)
        out.put(("ready", name, None))
        go.wait()
        messages: Iterator[tuple[str, bytes]] = traffic
        if probes is not None and job.probe_every:
            messages = _probed(traffic, probes, job.probe_every)
        messages = _held_back(messages, consumed, job.total)
        first = time.monotonic()
        result = run_traffic(
            publisher, messages, rate=job.rate, count=job.count, duration=job.seconds
        )
        acked = time.monotonic()
        # Reported before closing: the parent times the phase from these instants.
        out.put(
            (
                "done",
                name,
                {
                    "first": first,
                    "acked": acked,
                    "messages": result.published,
                    "acknowledged": result.acked,
                    "heartbeats": traffic.tally.heartbeats,
                },
            )
        )
        publisher.close()
        finish.wait(_FINISH_WAIT_S)
    except BaseException:
        out.put(("error", name, traceback.format_exc()))


def _probed(
    traffic: Traffic, probes: multiprocessing.Queue[tuple[str, int | str]], every: int
) -> Iterator[tuple[str, bytes]]:
    for n, (topic, payload) in enumerate(traffic):
        if n % every == 0:
            # (device, ts) is the key of the row the message becomes; a gateway's message is
            # traced by the gateway's own row, committed in the same batch as its children.
            probes.put((topic.split("/")[3], json.loads(payload)["ts"]))
        yield topic, payload


def _held_back(
    messages: Iterator[tuple[str, bytes]], consumed: Any, publishers: int
) -> Iterator[tuple[str, bytes]]:
    """Wait while this publisher is more than its share of ``_BACKLOG`` ahead of the consumer.

    ``consumed`` (shared memory) is kept up to date by whoever can see the consumer's
    progress. When the consumer is the bottleneck it then always has a deep backlog, without
    the broker dropping anything.
    """
    limit = _BACKLOG / publishers
    sent = 0
    while True:
        # Checked before drawing, so that the traffic's tally counts only what is sent.
        if sent % 100 == 0:
            while sent - consumed.value / publishers > limit:
                time.sleep(0.01)
        yield next(messages)
        sent += 1


def _subscriber(
    url: str,
    client_id: str,
    on_message: Callable[..., None],
    on_ready: Callable[[], None],
    receive_maximum: int | None = None,
) -> mqtt.Client:
    address = parse_mqtt_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = None
    if receive_maximum:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.ReceiveMaximum = receive_maximum

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe(SUBSCRIPTION, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: on_ready()
    client.on_message = on_message
    client.connect(
        address.host, address.port, keepalive=30, clean_start=True, properties=properties
    )
    client.loop_start()
    return client


def _discard_child(
    name: str,
    url: str,
    client_id: str,
    expected: int,
    receive_maximum: int,
    timeout: float,
    consumed: Any,
    out: multiprocessing.Queue[tuple[str, str, Any]],
    finish: multiprocessing.synchronize.Event,
) -> None:
    _child_setup()
    try:
        done = threading.Event()
        received = 0
        last = 0.0

        def on_message(*_: Any) -> None:
            # As small as a callback can be: the ceiling is MQTT's cost, not ours.
            nonlocal received, last
            received += 1
            if received % 1000 == 0:
                consumed.value = received
            if received >= expected:
                last = time.monotonic()
                done.set()

        client = _subscriber(
            url, client_id, on_message, lambda: out.put(("ready", name, None)), receive_maximum
        )
        done.wait(timeout)
        out.put(("done", name, {"received": received, "last": last, "complete": done.is_set()}))
        client.disconnect()
        client.loop_stop()
        finish.wait(_FINISH_WAIT_S)
    except BaseException:
        out.put(("error", name, traceback.format_exc()))


NAIVE_INSERT = """
INSERT INTO heartbeats (time, device_id, account_id, state, seq, reporter, received_at)
SELECT %s, id, account_id, %s, %s, %s, %s FROM devices WHERE id = %s
ON CONFLICT DO NOTHING
"""


def _naive_child(
    name: str,
    url: str,
    database_url: str,
    client_id: str,
    expected: int,
    seconds: float,
    consumed: Any,
    out: multiprocessing.Queue[tuple[str, str, Any]],
    finish: multiprocessing.synchronize.Event,
) -> None:
    """What one writes first: decode, one INSERT per heartbeat, commit, let paho ack."""
    _child_setup()
    try:
        conn = psycopg.connect(database_url, options="-c timezone=UTC")
        done = threading.Event()
        messages = rows = 0
        last = 0.0
        deadline = float("inf")

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            nonlocal messages, rows, last, deadline
            if done.is_set():
                return
            if messages == 0:
                deadline = time.monotonic() + seconds
            body = json.loads(message.payload)
            reporter = message.topic.split("/")[3]
            at = _ts_datetime(body["ts"])
            received = datetime.now(UTC)
            states = [(reporter, body["state"])]
            states += [(child["id"], child["state"]) for child in body.get("devices", ())]
            for device_id, state in states:
                conn.execute(NAIVE_INSERT, (at, state, body["seq"], reporter, received, device_id))
            conn.commit()
            messages += 1
            consumed.value = messages
            rows += len(states)
            last = time.monotonic()
            if messages >= expected or last >= deadline:
                done.set()

        client = _subscriber(url, client_id, on_message, lambda: out.put(("ready", name, None)))
        done.wait(seconds + 120)
        out.put(("done", name, {"messages": messages, "rows": rows, "last": last}))
        client.disconnect()
        client.loop_stop()
        # Closed only after the parent has read the CPU of its PostgreSQL session.
        finish.wait(_FINISH_WAIT_S)
        conn.close()
    except BaseException:
        out.put(("error", name, traceback.format_exc()))


def _ts_datetime(ts: int | str) -> datetime:
    # The processor's rule (ingest/processor.py _parse_ts), so that probe keys match rows.
    if isinstance(ts, int):
        return _EPOCH + timedelta(milliseconds=ts)
    return datetime.fromisoformat(ts).astimezone(UTC)


class Children:
    """A phase's child processes, the queue they report on and their common start signal."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.out: multiprocessing.Queue[tuple[str, str, Any]] = self.ctx.Queue()
        self.go = self.ctx.Event()
        #: Children stay alive after reporting until this is set, so their CPU can be read.
        self.finish = self.ctx.Event()
        #: Messages the consumer has taken so far, as far as anyone can tell (_held_back).
        self.consumed = self.ctx.RawValue("q", 0)
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.results: dict[str, Any] = {}
        self._ready: set[str] = set()

    def start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        proc = self.ctx.Process(target=target, args=(name, *args, self.out, self.finish), name=name)
        proc.daemon = True
        proc.start()
        self.procs[name] = proc

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(prefix) and p.pid]

    def _pump(self, timeout: float) -> None:
        try:
            kind, name, payload = (
                self.out.get(timeout=timeout) if timeout else self.out.get_nowait()
            )
        except queue.Empty:
            return
        if kind == "error":
            raise BenchError(f"{name} failed:\n{payload}")
        if kind == "ready":
            self._ready.add(name)
        else:
            self.results[name] = payload

    def wait_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not set(names) <= self._ready:
            if time.monotonic() > deadline:
                raise BenchError(f"not ready after {timeout:.0f}s: {set(names) - self._ready}")
            self._check_alive()
            self._pump(0.2)

    def poll(self, names: Sequence[str], timeout: float = 0.0) -> bool:
        """Collect reports; True once every named child has reported its result."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            self._pump(max(0.0, min(0.05, deadline - time.monotonic())))
            if set(names) <= set(self.results):
                return True
            if time.monotonic() >= deadline:
                return False

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.exitcode not in (None, 0) and name not in self.results:
                self._pump(0.5)  # its error report may still be in the queue
                raise BenchError(f"{name} exited with code {proc.exitcode}")

    def close(self) -> None:
        self.go.set()  # children still waiting to start would otherwise hang
        self.finish.set()
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self.out.close()


# --------------------------------------------------------------------------- CPU and memory


def process_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of proc(5); fields[0] is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def pids_named(name: str, keep: Callable[[str], bool] = lambda _cmdline: True) -> list[int]:
    """Processes whose command is ``name`` and whose command line passes ``keep``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != name:
                continue
            if not keep((entry / "cmdline").read_text().replace("\0", " ")):
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def postgres_pids(database: str) -> list[int]:
    """The server's own processes and the sessions on ``database``, not other people's."""

    def ours(cmdline: str) -> bool:
        # A session's title is "postgres: ... user database host(port) ..."; the server's
        # own processes (postmaster, WAL writer, checkpointer...) carry no client address.
        is_session = "(" in cmdline or "[local]" in cmdline
        return database in cmdline or not is_session

    return pids_named("postgres", ours)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuMeter:
    """CPU used per party over a phase, in cores (1.0: one core busy all along)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[int, float] = {}
        self._busy = 0.0
        self._t = 0.0

    def _snapshot(self) -> dict[str, dict[int, float]]:
        snap: dict[str, dict[int, float]] = {}
        for group, pids in self.groups.items():
            snap[group] = {}
            for pid in pids():
                cpu = process_cpu_seconds(pid)
                if cpu is not None:
                    snap[group][pid] = cpu
        return snap

    def start(self) -> None:
        self._start = {pid: cpu for g in self._snapshot().values() for pid, cpu in g.items()}
        self._busy = machine_busy_seconds()
        self._t = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        elapsed = max(time.monotonic() - self._t, 1e-9)
        busy = machine_busy_seconds() - self._busy
        result: dict[str, float] = {}
        ours = 0.0
        for group, cpus in end.items():
            # A process born during the phase (a new PostgreSQL backend) started from zero.
            used = sum(cpu - self._start.get(pid, 0.0) for pid, cpu in cpus.items())
            result[group] = used / elapsed
            ours += used
        result["not ours"] = max(0.0, busy - ours) / elapsed
        result["machine"] = busy / elapsed
        result["seconds"] = elapsed
        return result


# --------------------------------------------------------------------------- workers


class Worker:
    """`devmeter ingest` as its own process, as it runs in production."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.env, self.workdir = name, env, workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def client_id(self) -> str:
        return self.env["DEVMETER_INGEST_CLIENT_ID"]

    def start(self, timeout: float = 60) -> Worker:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devmeter", "ingest"],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        # The worker logs "granted" once the broker has confirmed its subscription.
        while "granted" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not subscribe:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def forget_session(url: str, client_id: str) -> None:
    """End a stopped worker's persistent session, which would otherwise stay subscribed.

    Workers run with the production session expiry (a week), and the broker would queue every
    later phase's messages for a session left behind.
    """
    address = parse_mqtt_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(address.host, address.port, clean_start=True, properties=properties)
    client.loop_start()
    connected.wait(10)
    client.disconnect()
    client.loop_stop()


# --------------------------------------------------------------------------- results


@dataclass
class Throughput:
    name: str
    messages: int
    heartbeats: int
    seconds: float
    publish_seconds: float
    cpu: dict[str, float]
    verified: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def msg_rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def row_rate(self) -> float:
        return self.heartbeats / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "heartbeats": self.heartbeats,
            "seconds": round(self.seconds, 3),
            "publish_seconds": round(self.publish_seconds, 3),
            "messages_per_s": round(self.msg_rate, 1),
            "heartbeats_per_s": round(self.row_rate, 1),
            "cpu_cores": {k: round(v, 3) for k, v in self.cpu.items()},
            "verified": self.verified,
            "notes": self.notes,
        }


@dataclass
class Paced:
    name: str
    target_rate: float
    seconds: float
    messages: int
    heartbeats: int
    latencies: list[float]
    rss_kib: list[tuple[float, int]]
    cpu: dict[str, float]
    verified: str = ""

    @property
    def msg_rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def rss(self) -> dict[str, float]:
        """First, last and max RSS (MiB), and the growth over the second half.

        The growth compares medians of three samples at the middle and at the end, so that
        one sample taken mid-batch does not decide it; the slope is a least-squares fit.
        """
        if len(self.rss_kib) < 4:
            return {}
        values = [kib / _KIB_PER_MIB for _, kib in self.rss_kib]
        half = len(values) // 2
        mid = statistics.median(values[max(0, half - 1) : half + 2])
        end = statistics.median(values[-3:])
        minutes = [t / 60 for t, _ in self.rss_kib[half:]]
        return {
            "first_mib": values[0],
            "last_mib": values[-1],
            "max_mib": max(values),
            "second_half_growth_mib": end - mid,
            "second_half_growth_share": (end - mid) / mid if mid else 0.0,
            "second_half_slope_mib_per_min": _slope(minutes, values[half:]),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "target_messages_per_s": round(self.target_rate, 1),
            "achieved_messages_per_s": round(self.msg_rate, 1),
            "seconds": round(self.seconds, 2),
            "messages": self.messages,
            "heartbeats": self.heartbeats,
            "latency_samples": len(self.latencies),
            "latency_p50_ms": round(1000 * self.quantile(0.50), 1),
            "latency_p99_ms": round(1000 * self.quantile(0.99), 1),
            "latency_max_ms": round(1000 * max(self.latencies, default=float("nan")), 1),
            "rss": {k: round(v, 4) for k, v in self.rss().items()},
            "rss_samples_kib": [[round(t, 1), kib] for t, kib in self.rss_kib],
            "cpu_cores": {k: round(v, 3) for k, v in self.cpu.items()},
            "verified": self.verified,
        }


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# --------------------------------------------------------------------------- phases


class Bench:
    def __init__(self, opts: Options, workdir: Path, database_url: str, mqtt_url: str) -> None:
        self.opts = opts
        self.workdir = workdir
        self.database_url = database_url
        self.mqtt_url = mqtt_url
        self.fleet_spec = FleetSpec(opts.devices, opts.gateways, opts.gateway_share)
        self.conn = psycopg.connect(database_url, autocommit=True, options="-c timezone=UTC")
        # The latency poll's own session. It runs 50 times a second as a prepared statement,
        # whose plan is made once, when the phase has just emptied the table: left to the
        # statistics, that plan hashes the whole table and costs more with every poll (it took
        # a third of a core). Index lookups are right at any size, so the plan is pinned.
        self.poll_conn = psycopg.connect(
            database_url,
            autocommit=True,
            options="-c timezone=UTC -c enable_seqscan=off -c enable_hashjoin=off "
            "-c enable_mergejoin=off",
        )
        self.run_id = secrets.token_hex(3)
        self.broker_dir = str(workdir / "broker")
        self.database_name = str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"])
        self.profile: dict[str, Any] | None = None
        self._phase_no = 0
        self.backend_pids = [conn.info.backend_pid for conn in (self.conn, self.poll_conn)]
        self.heartbeats_per_message = self.fleet_spec.heartbeats_per_message()

    # ---- database

    def rows(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM heartbeats").fetchone()
        return int(row[0]) if row else 0

    def truncate(self) -> None:
        """Every phase starts from the same database: no rows, devices as registered.

        Devices' current state is reset too: the worker derives events from it, so a phase
        would otherwise start from whatever states the previous phase left, and event counts
        would not compare between phases.
        """
        self.conn.execute("TRUNCATE heartbeats, device_state_events, rejected_heartbeats")
        self.conn.execute(
            "UPDATE devices SET state = 'active', state_at = registered_at, last_seen_at = NULL"
        )
        self.conn.execute("VACUUM ANALYZE devices")

    def verify(self, expected_rows: int) -> str:
        """Every heartbeat stored exactly once.

        Within a phase a device's seq never repeats (one publisher per device, counting up),
        so a duplicate, even one with another ts, would show as a repeated (device, seq).
        """
        row = self.conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, seq)), "
            "(SELECT count(*) FROM rejected_heartbeats), "
            "(SELECT count(*) FROM device_state_events) FROM heartbeats"
        ).fetchone()
        assert row is not None
        stored, distinct, rejected, events = (int(v) for v in row)
        if stored != expected_rows or distinct != stored or rejected:
            raise BenchError(
                f"stored {stored} heartbeats ({distinct} distinct, {rejected} rejected), "
                f"expected {expected_rows}"
            )
        return f"{stored} rows as expected, none twice, 0 rejected, {events} state events"

    def register_fleet(self) -> None:
        spec = self.fleet_spec
        say(
            f"registering {spec.devices} devices and {spec.gateways} gateways "
            f"({spec.gateway_share:.0%} of devices behind gateways)"
        )
        with psycopg.connect(
            self.database_url, row_factory=dict_row, options="-c timezone=UTC"
        ) as conn:
            ensure_fleet(
                conn,
                load_catalog(),
                account_ref=ACCOUNT,
                device_class="lte-m",
                prefix=PREFIX,
                devices=spec.devices,
                gateways=spec.gateways,
                gateway_share=spec.gateway_share,
                at=datetime.now(UTC) - timedelta(minutes=1),
                progress=lambda done, total: (
                    say(f"registered {done}/{total}") if done % 2500 == 0 or done == total else None
                ),
            )
        # Statistics as a database in service would have them: the worker's statements join
        # on devices, and a plan made for an empty table would not be representative.
        self.conn.execute("ANALYZE devices")

    # ---- processes

    def worker_env(self, client_id: str, group: str) -> dict[str, str]:
        # Production defaults: only where the servers are and who this worker is, plus
        # --worker-env; no DEVMETER_ setting from the caller's shell leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMETER_")}
        env |= {
            "DEVMETER_DATABASE_URL": self.database_url,
            "DEVMETER_MQTT_URL": self.mqtt_url,
            "DEVMETER_INGEST_CLIENT_ID": client_id,
            "DEVMETER_INGEST_SHARE_GROUP": group,
            "DEVMETER_DATA_DIR": str(self.workdir / "devmeter-data"),
        }
        return env | self.opts.worker_env

    def worker_max_inflight(self) -> int:
        override = self.opts.worker_env.get("DEVMETER_INGEST_MAX_INFLIGHT")
        if override:
            return int(override)
        return int(Settings.model_fields["ingest_max_inflight"].default)

    def start_workers(self, tag: str, n: int) -> list[Worker]:
        # A fresh share group per phase: nothing a previous phase left can reach this one.
        self._phase_no += 1
        group = f"bench{self.run_id}{tag}{self._phase_no}"
        workers = [
            Worker(f"{tag}-worker{i}", self.worker_env(f"{group}-{i}", group), self.workdir)
            for i in range(n)
        ]
        started: list[Worker] = []
        try:
            for w in workers:
                started.append(w.start())
        except BaseException:
            self.stop_workers(started)
            raise
        say(f"{tag}: {n} worker(s) subscribed, pid {', '.join(str(w.pid) for w in workers)}")
        return workers

    def stop_workers(self, workers: Sequence[Worker]) -> None:
        for w in workers:
            w.stop()
            # The worker's own periodic line (rate, mean batch time, queue depth).
            for line in w.log.read_text(errors="replace").splitlines():
                if "ingest:" in line:
                    say(f"{w.name}: {line.split('ingest:', 1)[1].strip()}")
        for w in workers:
            with contextlib.suppress(Exception):
                forget_session(self.mqtt_url, w.client_id)

    def start_publishers(
        self,
        children: Children,
        tag: str,
        *,
        count: int | None,
        rate: float,
        seconds: float | None,
        probes: multiprocessing.Queue[tuple[str, int | str]] | None = None,
    ) -> list[str]:
        p = self.opts.publishers
        names = []
        for i in range(p):
            job = PublishJob(
                url=self.mqtt_url,
                fleet=self.fleet_spec,
                index=i,
                total=p,
                count=None if count is None else _share(count, i, p),
                rate=rate / p,
                seconds=seconds,
                window=self.opts.window,
                probe_every=_PROBE_EVERY if probes is not None else 0,
                client_id=f"bench{self.run_id}-{tag}-pub{i}",
            )
            children.start(f"pub{i}", _publish_child, job, children.go, children.consumed, probes)
            names.append(f"pub{i}")
        children.wait_ready(names)
        return names

    def expected_heartbeats(self, count: int) -> int:
        """Heartbeats that ``count`` messages carry, drawn as the publishers will draw them."""
        p = self.opts.publishers
        total = 0
        for i in range(p):
            traffic = self.fleet_spec.traffic(i, p)
            for _ in range(_share(count, i, p)):
                next(traffic)
            total += traffic.tally.heartbeats
        return total

    def cpu_meter(self, children: Children, consumers: Callable[[], list[int]]) -> CpuMeter:
        return CpuMeter(
            {
                "publishers": lambda: children.pids("pub"),
                "consumer": consumers,
                "broker": lambda: pids_named("mosquitto", lambda c: self.broker_dir in c),
                # Background work of the server counts as ours, other databases' sessions
                # (other people's tests on a shared server) do not, nor the bench's own
                # queries (row counts, latency polls), which count as the bench's.
                "postgres": lambda: [
                    p for p in postgres_pids(self.database_name) if p not in self.backend_pids
                ],
                "bench": lambda: [os.getpid(), *self.backend_pids],
            }
        )

    @staticmethod
    def published(children: Children, names: Sequence[str]) -> tuple[float, float, int, int]:
        """First publish, last acknowledgement, messages and heartbeats over the publishers."""
        results = [children.results[n] for n in names]
        return (
            min(r["first"] for r in results),
            max(r["acked"] for r in results),
            sum(int(r["acknowledged"]) for r in results),
            sum(int(r["heartbeats"]) for r in results),
        )

    # ---- phases

    def ceiling(self) -> Throughput:
        n = self.opts.messages
        # Connected as the worker is (MQTT 5, QoS 1, the same Receive Maximum), so that the
        # ceiling differs from the worker only by what is done with each message.
        inflight = self.worker_max_inflight()
        say(
            f"ceiling: a paho subscriber that counts and discards; {n} messages, "
            f"Receive Maximum {inflight}"
        )
        children = Children()
        try:
            client_id = f"bench{self.run_id}-discard"
            children.start(
                "discard",
                _discard_child,
                self.mqtt_url,
                client_id,
                n,
                inflight,
                900.0,
                children.consumed,
            )
            children.wait_ready(["discard"])
            pubs = self.start_publishers(children, "ceiling", count=n, rate=0.0, seconds=None)
            meter = self.cpu_meter(children, lambda: children.pids("discard"))
            meter.start()
            children.go.set()
            self._wait(
                children,
                [*pubs, "discard"],
                "ceiling",
                progress=lambda: f"{children.consumed.value} messages received",
            )
            cpu = meter.stop()
            first, acked, messages, heartbeats = self.published(children, pubs)
            sub = children.results["discard"]
            if not sub["complete"]:
                raise BenchError(f"the discard subscriber got {sub['received']} of {n} messages")
            return Throughput(
                "ceiling (paho, discard)",
                messages,
                heartbeats,
                sub["last"] - first,
                acked - first,
                cpu,
                f"{sub['received']} messages received",
            )
        finally:
            children.close()

    def naive(self) -> Throughput:
        n, cap = self.opts.naive_messages, self.opts.naive_seconds
        say(f"naive: INSERT and commit per message; {n} messages or {cap:.0f}s")
        self.truncate()
        children = Children()
        try:
            children.start(
                "naive",
                _naive_child,
                self.mqtt_url,
                self.database_url,
                f"bench{self.run_id}-naive",
                n,
                cap,
                children.consumed,
            )
            children.wait_ready(["naive"])
            pubs = self.start_publishers(children, "naive", count=n, rate=0.0, seconds=None)
            meter = self.cpu_meter(children, lambda: children.pids("naive"))
            meter.start()
            children.go.set()
            self._wait(children, [*pubs, "naive"], "naive", progress=lambda: f"{self.rows()} rows")
            cpu = meter.stop()
            first, acked, _m, _h = self.published(children, pubs)
            sub = children.results["naive"]
            stored = self.rows()
            if stored != sub["rows"]:
                raise BenchError(
                    f"the naive subscriber committed {sub['rows']} rows; {stored} found"
                )
            result = Throughput(
                "naive (INSERT+commit)",
                sub["messages"],
                sub["rows"],
                sub["last"] - first,
                acked - first,
                cpu,
                f"{stored} rows committed",
            )
            if sub["messages"] < n:
                result.notes.append(f"stopped after {cap:.0f}s, {sub['messages']} of {n} messages")
            return result
        finally:
            children.close()
            self.truncate()

    def devmeter(self, tag: str, n_workers: int, *, py_spy: str | None = None) -> Throughput:
        n = self.opts.messages
        say(f"{tag}: {n_workers} `devmeter ingest` worker(s); {n} messages")
        self.truncate()
        expected = self.expected_heartbeats(n)
        workers = self.start_workers(tag, n_workers)
        children = Children()
        spy: PySpy | None = None
        try:
            pubs = self.start_publishers(children, tag, count=n, rate=0.0, seconds=None)
            if py_spy:
                spy = PySpy(
                    py_spy, workers[0].pid, self.workdir / f"{tag}.py-spy.txt", self.workdir
                )
            meter = self.cpu_meter(children, lambda: [w.pid for w in workers])
            meter.start()
            children.go.set()
            t_end = self._wait_rows(children, pubs, expected, tag)
            cpu = meter.stop()
            if spy is not None:
                spy.stop()
                self.profile = spy.summary()
            children.poll(pubs, timeout=60)
            first, acked, messages, heartbeats = self.published(children, pubs)
            if heartbeats != expected:
                raise BenchError(f"publishers sent {heartbeats} heartbeats, expected {expected}")
            result = Throughput(
                f"devmeter, {n_workers} worker{'s' if n_workers > 1 else ''}",
                messages,
                heartbeats,
                t_end - first,
                acked - first,
                cpu,
                self.verify(expected),
            )
            result.notes.append(f"last row committed {t_end - acked:.2f}s after the last ack")
            return result
        finally:
            if spy is not None:
                spy.stop()
            children.close()
            self.stop_workers(workers)

    def paced(self, tag: str, rate: float, seconds: float) -> Paced:
        """One worker at ``rate`` messages/s: publish-to-commit latency and the worker's RSS.

        Every 25th message is traced: its publisher hands over (device, ts), and every 20 ms
        one indexed query asks which of the oldest outstanding ones are committed. A row counts
        as committed at the start of the first query that sees it, so each latency is an upper
        bound, by at most the poll interval plus the query's own time.
        """
        say(f"{tag}: 1 worker at {rate:,.0f} msg/s for {seconds:.0f}s")
        self.truncate()
        workers = self.start_workers(tag, 1)
        worker = workers[0]
        children = Children()
        probes: multiprocessing.Queue[tuple[str, int | str]] = children.ctx.Queue()
        outstanding: dict[tuple[str, datetime], float] = {}
        latencies: list[float] = []
        rss: list[tuple[float, int]] = []
        try:
            pubs = self.start_publishers(
                children, tag, count=None, rate=rate, seconds=seconds, probes=probes
            )
            meter = self.cpu_meter(children, lambda: [worker.pid])
            meter.start()
            started = time.monotonic()
            children.go.set()
            next_rss, next_say = started, started + 10
            expected: int | None = None
            settle_deadline = float("inf")
            while True:
                now = time.monotonic()
                if now >= next_rss:
                    kib = rss_kib(worker.pid)
                    if kib is None or worker.proc is None or worker.proc.poll() is not None:
                        raise BenchError(f"the worker exited:\n{worker.tail()}")
                    rss.append((now - started, kib))
                    next_rss += _RSS_EVERY_S
                _drain_probes(probes, outstanding)
                self._poll_probes(outstanding, latencies)
                # Every traced message stands for _PROBE_EVERY committed ones.
                children.consumed.value = _PROBE_EVERY * len(latencies)
                if expected is None and children.poll(pubs):
                    expected = self.published(children, pubs)[3]
                    settle_deadline = now + 60
                if expected is not None:
                    _drain_probes(probes, outstanding)
                    if not outstanding:
                        if self.rows() >= expected:
                            break
                        time.sleep(0.2)  # count(*) on the whole table: not 50 times a second
                    if now > settle_deadline:
                        raise BenchError(f"{tag}: not all committed 60 s after the last publish")
                if now >= next_say:
                    p99 = sorted(latencies)[int(0.99 * len(latencies))] if latencies else 0.0
                    say(
                        f"{tag}: {now - started:4.0f}s, {len(latencies)} traced, p99 so far "
                        f"{1000 * p99:.0f} ms, worker RSS {rss[-1][1] / _KIB_PER_MIB:.1f} MiB"
                    )
                    next_say += 10
                time.sleep(max(0.0, _PROBE_POLL_S - (time.monotonic() - now)))
            cpu = meter.stop()
            kib = rss_kib(worker.pid)
            if kib is not None:
                rss.append((time.monotonic() - started, kib))
            first, acked, messages, heartbeats = self.published(children, pubs)
            return Paced(
                tag,
                rate,
                acked - first,
                messages,
                heartbeats,
                latencies,
                rss,
                cpu,
                self.verify(heartbeats),
            )
        finally:
            children.close()
            self.stop_workers(workers)

    def _poll_probes(
        self, outstanding: dict[tuple[str, datetime], float], latencies: list[float]
    ) -> None:
        if not outstanding:
            return
        # Oldest first (insertion order): commits come roughly in publish order.
        keys = list(itertools.islice(outstanding, _PROBE_CAP))
        # Taken before the query: the row was committed before the query's snapshot.
        asked = time.time()
        found = self.poll_conn.execute(
            "SELECT p.i FROM unnest(%s::text[], %s::timestamptz[]) WITH ORDINALITY "
            "AS p (device_id, time, i) WHERE EXISTS (SELECT 1 FROM heartbeats h "
            "WHERE h.device_id = p.device_id AND h.time = p.time)",
            ([k[0] for k in keys], [k[1] for k in keys]),
            prepare=True,
        ).fetchall()
        for (i,) in found:
            latencies.append(asked - outstanding.pop(keys[int(i) - 1]))

    def _wait(
        self,
        children: Children,
        names: Sequence[str],
        tag: str,
        *,
        progress: Callable[[], str] | None = None,
        timeout: float = 900,
    ) -> None:
        deadline = time.monotonic() + timeout
        next_say = time.monotonic() + 5
        while not children.poll(names, timeout=0.5):
            if time.monotonic() > deadline:
                raise BenchError(f"{tag}: not done after {timeout:.0f}s")
            if progress is not None and time.monotonic() >= next_say:
                say(f"{tag}: {progress()}")
                next_say += 5

    def _wait_rows(self, children: Children, pubs: Sequence[str], expected: int, tag: str) -> float:
        """Poll the row count until it reaches ``expected``; returns when that was first seen.

        count(*) is not free on a growing table and competes with the worker for the cores,
        so it runs every second while the end is far, every 50 ms once it is near.
        """
        last_rows, last_t = 0, time.monotonic()
        rate = 0.0
        next_say = last_t + 5
        while True:
            asked = time.monotonic()
            rows = self.rows()
            if rows >= expected:
                return asked
            children.consumed.value = int(rows / self.heartbeats_per_message)
            children.poll(pubs)
            now = time.monotonic()
            if rows > last_rows:
                rate = (rows - last_rows) / max(now - last_t, 1e-3)
                last_rows, last_t = rows, now
            elif now - last_t > 60:
                raise BenchError(f"{tag}: stuck at {rows} of {expected} rows for 60 s")
            if now >= next_say:
                say(f"{tag}: {rows}/{expected} rows, {rate:,.0f} rows/s")
                next_say += 5
            near = rate > 0 and (expected - rows) / rate < 2.0
            time.sleep(0.05 if near else 1.0)


def _share(count: int, index: int, total: int) -> int:
    return count // total + (1 if index < count % total else 0)


def _drain_probes(
    probes: multiprocessing.Queue[tuple[str, int | str]],
    outstanding: dict[tuple[str, datetime], float],
) -> None:
    while True:
        try:
            device_id, ts = probes.get_nowait()
        except queue.Empty:
            return
        at = _ts_datetime(ts)
        outstanding[(device_id, at)] = (at - _EPOCH).total_seconds()


# --------------------------------------------------------------------------- profile


class PySpy:
    """py-spy sampling one worker for a phase, then a summary of where its time went.

    ``--gil`` samples only the thread holding the GIL: py-spy's idle detection counts a
    thread waiting in psycopg or in Thread.join as busy, while the GIL holder is the one
    running Python. The share of samples that find a holder is how busy the interpreter is,
    and 1.0 means the worker is bound by one core of Python.
    """

    rate = 100

    def __init__(self, exe: str, pid: int, output: Path, workdir: Path) -> None:
        self.output = output
        log_path = workdir / "py-spy.log"
        argv = [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--gil"]
        argv += ["--threads", "--nolineno", "--format", "raw", "--output", str(output)]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        time.sleep(1.0)  # attached before the phase starts
        if self.proc.poll() is not None:
            raise BenchError(f"py-spy did not start: {log_path.read_text()}")
        self.started = time.monotonic()
        self.seconds = 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.seconds = time.monotonic() - self.started
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def summary(self, top: int = 12) -> dict[str, Any]:
        threads: Counter[str] = Counter()
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in self.output.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            thread, *frames = stack.split(";")
            total += count
            threads[_thread_label(thread)] += count
            if frames:
                own[_frame(frames[-1])] += count
            for name in {_frame(f) for f in frames}:
                inclusive[name] += count
        span = self.rate * max(self.seconds, 1e-9)
        return {
            "samples": total,
            "seconds": round(self.seconds, 2),
            "gil_busy": round(total / span, 3),
            "threads_gil": {t: round(n / span, 3) for t, n in threads.most_common()},
            "self": [(f, round(n / total, 3)) for f, n in own.most_common(top)] if total else [],
            "inclusive": [(f, round(n / total, 3)) for f, n in inclusive.most_common(2 * top)]
            if total
            else [],
            "raw": str(self.output),
        }


def _frame(frame: str) -> str:
    # "function (path/to/file.py)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit('/', 1)[-1]})" if where else name


def _thread_label(thread: str) -> str:
    # py-spy names threads "thread (<tid>): <name>".
    name = thread.partition(": ")[2] or thread
    if name.startswith("paho-mqtt-client"):
        return "paho network thread (reads, on_message)"
    if name == "ingest":
        return "ingest thread (collect, process, write, ack)"
    return name


# --------------------------------------------------------------------------- servers


@dataclass
class Servers:
    database_url: str
    admin_url: str
    postgres: str
    mqtt_url: str
    mosquitto: str
    storage: str


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def start_servers(opts: Options, workdir: Path, stack: ExitStack) -> Servers:
    admin_url = opts.database_url
    where = admin_url.split("@")[-1]
    if opts.embedded_postgres or not _reachable(admin_url):
        if not opts.embedded_postgres:
            say(f"PostgreSQL at {where} not reachable: starting an embedded one")
        pg = start_postgres(workdir / "postgres")
        stack.callback(pg.stop)
        admin_url, where = pg.url, f"embedded, {pg.url.split('@')[-1]}"
    name = f"devmeter_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        row = conn.execute("SHOW server_version").fetchone()
        pg_version = str(row[0]) if row else "?"
    stack.callback(_drop_database, admin_url, name)
    database_url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    say(f"scratch database {name} on PostgreSQL {pg_version} ({where})")
    storage = migrate(database_url).mode

    try:
        broker = start_broker(workdir / "broker", prefer="mosquitto")
    except EmbeddedServerError as exc:
        raise BenchError(f"a private Mosquitto is needed: {exc}") from exc
    stack.callback(broker.stop)
    say(f"private Mosquitto at {broker.url}")
    return Servers(
        database_url=database_url,
        admin_url=admin_url,
        postgres=f"PostgreSQL {pg_version} ({where}, database {name})",
        mqtt_url=broker.url,
        mosquitto=f"{_mosquitto_version()} (private, {broker.url}, max_queued_messages 100000)",
        storage=storage,
    )


def _drop_database(admin_url: str, name: str) -> None:
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        say(f"dropped {name}")
    except psycopg.Error as exc:
        say(f"could not drop {name}: {exc}")


def _mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        return "mosquitto ?"
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, check=False, timeout=10)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "mosquitto ?"


def machine_info() -> dict[str, Any]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paho_mqtt": version("paho-mqtt"),
        "psycopg": version("psycopg"),
    }


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    opts: Options
    info: dict[str, Any]
    servers: Servers | None = None
    heartbeats_per_message: float = 0.0
    #: Every run of each throughput phase ("ceiling", "one", "two", "naive"); see --repeat.
    runs: dict[str, list[Throughput]] = field(default_factory=dict)
    latency: Paced | None = None
    soak: Paced | None = None
    profiled: Throughput | None = None
    profile: dict[str, Any] | None = None
    half_rate: float = 0.0

    def best(self, key: str) -> Throughput | None:
        """The fastest run: other people's load only ever slows a run down."""
        return max(self.runs.get(key, []), key=lambda t: t.msg_rate, default=None)

    @property
    def ceiling(self) -> Throughput | None:
        return self.best("ceiling")

    @property
    def one(self) -> Throughput | None:
        return self.best("one")

    @property
    def two(self) -> Throughput | None:
        return self.best("two")

    @property
    def naive(self) -> Throughput | None:
        return self.best("naive")


def run(opts: Options) -> Results:
    results = Results(opts, machine_info())
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="devmeter-bench-"))
        keep = [opts.keep]

        def clean_up() -> None:
            if not keep[0]:
                shutil.rmtree(workdir, ignore_errors=True)

        stack.callback(clean_up)
        try:
            servers = start_servers(opts, workdir, stack)
            results.servers = servers
            bench = Bench(opts, workdir, servers.database_url, servers.mqtt_url)
            stack.callback(bench.conn.close)
            stack.callback(bench.poll_conn.close)
            bench.register_fleet()
            results.heartbeats_per_message = bench.heartbeats_per_message
            _run_phases(bench, results)
        except BaseException:
            keep[0] = True
            say(f"logs kept in {workdir}")
            raise
        if opts.keep:
            say(f"worker and broker logs (and py-spy samples) kept in {workdir}")
    return results


def _run_phases(bench: Bench, results: Results) -> None:
    opts = bench.opts
    phases = set(opts.phases)
    # Rounds of the throughput phases, interleaved so that a burst of other people's load
    # falls on all of them alike; each figure is then the best of its runs.
    for round_no in range(1, opts.repeat + 1):
        if opts.repeat > 1:
            say(f"round {round_no} of {opts.repeat}")
        if "ceiling" in phases:
            results.runs.setdefault("ceiling", []).append(_report(bench.ceiling()))
        if "devmeter" in phases:
            results.runs.setdefault("one", []).append(_report(bench.devmeter("devmeter", 1)))
        if "naive" in phases:
            results.runs.setdefault("naive", []).append(_report(bench.naive()))
        if "two" in phases:
            results.runs.setdefault("two", []).append(_report(bench.devmeter("two", 2)))
    one = results.one
    half = opts.half_rate or (one.msg_rate / 2 if one else 0.0)
    results.half_rate = half
    if "latency" in phases:
        results.latency = bench.paced("latency", half, opts.latency_seconds)
        say(
            f"latency: p50 {1000 * results.latency.quantile(0.5):.0f} ms, "
            f"p99 {1000 * results.latency.quantile(0.99):.0f} ms"
        )
    if "soak" in phases:
        results.soak = bench.paced("soak", half, opts.soak_seconds)
    if opts.profile and opts.py_spy:
        results.profiled = _report(bench.devmeter("profiled", 1, py_spy=opts.py_spy))
        results.profile = bench.profile


def _report(result: Throughput) -> Throughput:
    say(
        f"{result.name}: {result.msg_rate:,.0f} msg/s, {result.row_rate:,.0f} rows/s "
        f"({result.seconds:.1f}s); {result.verified}"
    )
    return result


# --------------------------------------------------------------------------- report


def targets(r: Results) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    if r.one and r.ceiling:
        share = r.one.msg_rate / r.ceiling.msg_rate
        out.append(
            (
                f"devmeter (1 worker) >= {TARGET_OF_CEILING:.0%} of ceiling, msg/s",
                f"{share:.0%}",
                share >= TARGET_OF_CEILING,
            )
        )
    if r.one and r.naive:
        times = r.one.msg_rate / r.naive.msg_rate
        out.append(
            (
                f"devmeter (1 worker) >= {TARGET_OVER_NAIVE:.0f}x naive, msg/s",
                f"{times:.1f}x",
                times >= TARGET_OVER_NAIVE,
            )
        )
    if r.latency:
        p99 = r.latency.quantile(0.99)
        out.append(
            (
                f"p99 publish-to-commit < {TARGET_P99_S:.0f} s at half rate",
                f"{1000 * p99:.0f} ms",
                p99 < TARGET_P99_S,
            )
        )
    if r.soak:
        rss = r.soak.rss()
        if rss:
            growth = rss["second_half_growth_share"]
            out.append(
                (
                    f"worker RSS flat over the soak (2nd half <= +{TARGET_RSS_GROWTH:.0%})",
                    f"{growth:+.1%} ({rss['second_half_growth_mib']:+.1f} MiB)",
                    growth <= TARGET_RSS_GROWTH,
                )
            )
    return out


def render(r: Results) -> str:
    o = r.opts
    lines: list[str] = []
    add = lines.append
    info = r.info
    add("devmeter ingest benchmark" + (" (--quick)" if o.quick else ""))
    add(
        f"  machine:    {info['nproc']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"load average at start {' '.join(str(x) for x in info['load_average_at_start'])}"
    )
    if r.servers:
        add(f"  broker:     {r.servers.mosquitto}")
        add(f"  database:   {r.servers.postgres}, storage mode {r.servers.storage}")
    add(
        f"  software:   Python {info['python']}, paho-mqtt {info['paho_mqtt']}, "
        f"psycopg {info['psycopg']}"
    )
    bound = round(o.devices * o.gateway_share) if o.gateways else 0
    add(
        f"  fleet:      {o.devices} devices, {o.gateways} gateways with {bound} devices behind "
        f"them; {r.heartbeats_per_message:.2f} heartbeats per message"
    )
    add(
        f"  publishers: {o.publishers} processes, QoS 1, at most {o.window} unacknowledged "
        "each; throughput phases publish as fast as acknowledged"
    )
    settings = ", ".join(f"{k}={v}" for k, v in o.worker_env.items()) or "production defaults"
    add(f"  worker:     `devmeter ingest`, {settings}")
    add("")

    rows = [x for x in (r.ceiling, r.one, r.two, r.naive) if x is not None]
    if rows:
        add("throughput: first publish -> last message received (ceiling) / last row committed")
        if o.repeat > 1:
            add(f"  best of {o.repeat} runs each (msg/s of every run below)")
        add(
            f"  {'phase':<26}{'messages':>9}{'rows':>9}{'s':>8}{'msg/s':>9}{'rows/s':>9}"
            f"{'/ceiling':>9}{'pub s':>7}"
        )
        for x in rows:
            vs = f"{x.msg_rate / r.ceiling.msg_rate:.0%}" if r.ceiling else "-"
            add(
                f"  {x.name:<26}{x.messages:>9}{x.heartbeats:>9}{x.seconds:>8.1f}"
                f"{x.msg_rate:>9,.0f}{x.row_rate:>9,.0f}{vs:>9}{x.publish_seconds:>7.1f}"
            )
        if r.one and r.two:
            add(f"  two workers / one worker: {r.two.msg_rate / r.one.msg_rate:.2f}x")
        for x in rows:
            add(f"  {x.name}: {x.verified}" + "".join(f"; {n}" for n in x.notes))
        if o.repeat > 1:
            for runs in r.runs.values():
                rates = " / ".join(f"{t.msg_rate:,.0f}" for t in runs)
                add(f"  {runs[0].name} runs: {rates} msg/s")
        add("  (pub s: first publish -> last publisher acknowledgement)")
        add("")

    paced = [x for x in (r.latency, r.soak) if x is not None]
    if paced:
        add(f"latency and memory: 1 worker at half the 1-worker rate ({r.half_rate:,.0f} msg/s)")
        add(
            f"  {'phase':<9}{'msg/s':>8}{'s':>6}{'traced':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'max ms':>8}   worker RSS MiB first/last/max, 2nd-half growth"
        )
        for p in paced:
            rss = p.rss()
            memory = (
                f"{rss['first_mib']:.1f}/{rss['last_mib']:.1f}/{rss['max_mib']:.1f}, "
                f"{rss['second_half_growth_mib']:+.1f} MiB "
                f"({rss['second_half_growth_share']:+.1%}; "
                f"{rss['second_half_slope_mib_per_min']:+.2f} MiB/min)"
                if rss
                else "-"
            )
            add(
                f"  {p.name:<9}{p.msg_rate:>8,.0f}{p.seconds:>6.0f}{len(p.latencies):>8}"
                f"{1000 * p.quantile(0.5):>8.0f}{1000 * p.quantile(0.99):>8.0f}"
                f"{1000 * max(p.latencies, default=0):>8.0f}   {memory}"
            )
        add(
            f"  latency: every {_PROBE_EVERY}th message traced, polled every "
            f"{1000 * _PROBE_POLL_S:.0f} ms; an upper bound by up to one poll (see README)"
        )
        for p in paced:
            add(f"  {p.name}: {p.verified}")
        add("")

    cpu_rows = [(x.name, x.messages, x.cpu) for x in rows]
    cpu_rows += [(f"{p.name} (1 worker)", p.messages, p.cpu) for p in paced]
    if r.profiled:
        cpu_rows.append((r.profiled.name + " (py-spy)", r.profiled.messages, r.profiled.cpu))
    if cpu_rows:
        groups = ["publishers", "consumer", "broker", "postgres", "bench", "not ours", "machine"]
        add(
            "CPU, in cores (1.00 = one core busy for the whole phase; the machine has "
            f"{info['nproc']}), and CPU time per message"
        )
        add(
            f"  {'phase':<26}"
            + "".join(f"{g:>10}" for g in groups)
            + f"{'consumer':>10}{'postgres':>10}"
        )
        add(f"  {'':<26}{'':>{10 * len(groups)}}{'us/msg':>10}{'us/msg':>10}")
        for name, messages, cpu in cpu_rows:
            per = [
                1e6 * cpu.get(g, 0.0) * cpu.get("seconds", 0.0) / messages if messages else 0.0
                for g in ("consumer", "postgres")
            ]
            add(
                f"  {name:<26}"
                + "".join(f"{cpu.get(g, 0.0):>10.2f}" for g in groups)
                + "".join(f"{v:>10.0f}" for v in per)
            )
        add(
            "  (consumer: the discard/naive subscriber or the worker(s); postgres: the server's\n"
            "  own processes and the consumer's sessions; bench: this process and its queries\n"
            "  (row counts, latency polls); not ours: everything else on the machine.\n"
            "  Per message: CPU time over the phase / messages, which moves much less with\n"
            "  other people's load than the rates do)"
        )
        add("")

    if r.profile:
        pr = r.profile
        add(
            f"where the worker's time goes: py-spy --gil, {pr['samples']} samples over "
            f"{pr['seconds']:.0f}s; the GIL was held {pr['gil_busy']:.0%} of the time"
        )
        add("  share of the time each thread held the GIL:")
        for thread, share in pr["threads_gil"].items():
            add(f"    {share:>6.1%}  {thread}")
        add("  self (share of GIL samples):")
        for name, share in pr["self"]:
            add(f"    {share:>6.1%}  {name}")
        add("  inclusive:")
        for name, share in pr["inclusive"]:
            add(f"    {share:>6.1%}  {name}")
        add("")

    checks = targets(r)
    if checks:
        add("targets")
        for label, value, ok in checks:
            status = "met" if ok else "NOT MET"
            add(f"  {label:<58}{value:>24}  {status}")
        if r.soak:
            add(
                f"  (soak latency: p50 {1000 * r.soak.quantile(0.5):.0f} ms, "
                f"p99 {1000 * r.soak.quantile(0.99):.0f} ms over {len(r.soak.latencies)} traced)"
            )
    return "\n".join(lines)


def to_json(r: Results) -> dict[str, Any]:
    o = r.opts
    return {
        "machine": r.info,
        "servers": None
        if r.servers is None
        else {
            "broker": r.servers.mosquitto,
            "postgres": r.servers.postgres,
            "storage": r.servers.storage,
        },
        "options": {
            "messages": o.messages,
            "naive_messages": o.naive_messages,
            "publishers": o.publishers,
            "window": o.window,
            "devices": o.devices,
            "gateways": o.gateways,
            "gateway_share": o.gateway_share,
            "latency_seconds": o.latency_seconds,
            "soak_seconds": o.soak_seconds,
            "repeat": o.repeat,
            "worker_env": o.worker_env,
            "quick": o.quick,
        },
        "heartbeats_per_message": round(r.heartbeats_per_message, 4),
        "half_rate": round(r.half_rate, 1),
        "throughput": {
            key: x.as_json()
            for key, x in (
                ("ceiling", r.ceiling),
                ("devmeter_1", r.one),
                ("devmeter_2", r.two),
                ("naive", r.naive),
                ("devmeter_profiled", r.profiled),
            )
            if x is not None
        },
        "throughput_runs": {key: [t.as_json() for t in runs] for key, runs in r.runs.items()},
        "latency": r.latency.as_json() if r.latency else None,
        "soak": r.soak.as_json() if r.soak else None,
        "profile": r.profile,
        "targets": [{"target": t, "value": v, "met": ok} for t, v, ok in targets(r)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    # --source jetstream: the NATS JetStream path, a bench of its own (bench/ingest_jetstream.py).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--source", choices=("mqtt", "jetstream"), default="mqtt")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.source == "jetstream":
        from bench.ingest_jetstream import main as jetstream_main

        return jetstream_main(rest)
    opts = parse_options(rest)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        results = run(opts)
    except KeyboardInterrupt:
        say("interrupted; servers stopped and scratch database dropped")
        return 130
    except BenchError as exc:
        say(f"failed: {exc}")
        return 1
    print(render(results))
    if opts.json_path:
        opts.json_path.write_text(json.dumps(to_json(results), indent=2) + "\n")
        say(f"results written to {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
