"""Ingest benchmark, JetStream path: `devmeter ingest` workers on a 3-node NATS cluster.

Run with ``./dev bench ingest --source jetstream`` (or ``./dev bench ingest_jetstream``;
``--help`` for options). One run, on a private 3-node cluster on loopback (stream replicated 3
times) and a scratch database:

* throughput with 1 and then 2 workers: N messages published as fast as the stream takes them,
  msg/s from first publish to last row committed, CPU µs per message of the workers and of
  the NATS nodes;
* latency with 1 and 2 workers: publish -> commit p50/p99 at a fixed rate (every 10th message
  is traced: the time its row is first seen, polled every 10 ms, minus its publish time);
* faults: with 2 workers, one worker SIGKILLed mid-run, then the stream's leader node
  SIGKILLed mid-run; each reports lost and doubled (rows in the database vs messages
  published).

Publisher, NATS nodes, workers and PostgreSQL share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import psycopg
from psycopg import sql

from bench.ingest import DEFAULT_DATABASE_URL, CpuMeter, _drop_database, postgres_pids
from devmeter.migrate import migrate
from ingest.jetstream import JetStreamOptions, connect, ensure_stream
from ingest.simulate import ensure_fleet, fleet_ids
from metering.catalog import load_catalog
from tests.nats import NATS_SERVER, NatsCluster

ACCOUNT = "benchjs"
PREFIX = "bjs"
_PROBE_EVERY = 10
_POLL_S = 0.01


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    messages: int
    rate: float
    latency_seconds: float
    devices: int
    database_url: str
    json_path: Path | None


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="./dev bench ingest --source jetstream",
        description="Ingest through NATS JetStream: 1 and 2 workers, latency, worker and node "
        "killed mid-run. PostgreSQL: DEVMETER_BENCH_DATABASE_URL (default the local server).",
    )
    add = parser.add_argument
    add("--messages", type=int, default=20_000, help="messages per throughput phase (20000)")
    add("--rate", type=float, default=2_000.0, help="msg/s of the latency phases (2000)")
    add("--latency-seconds", type=float, default=5.0, help="length of a latency phase (5)")
    add("--devices", type=int, default=1_000, help="devices in the fleet (1000)")
    add("--json", type=Path, dest="json_path", metavar="FILE", help="also write results here")
    args = parser.parse_args(argv)
    return Options(
        messages=args.messages,
        rate=args.rate,
        latency_seconds=args.latency_seconds,
        devices=args.devices,
        database_url=os.environ.get("DEVMETER_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        json_path=args.json_path,
    )


@dataclass
class Phase:
    name: str
    workers: int
    published: int
    stored: int
    distinct: int
    seconds: float
    msg_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    worker_cpu_us_per_msg: float | None = None
    nats_cpu_us_per_msg: float | None = None
    publish_retries: int = 0
    note: str = ""

    @property
    def lost(self) -> int:
        return self.published - self.distinct

    @property
    def doubled(self) -> int:
        return self.stored - self.distinct


@dataclass
class Publisher:
    """Publishes heartbeats with seq from a global counter, each until the stream has it."""

    url: str
    devices: list[str]
    next_seq: int = 0
    retries: int = 0
    #: seq -> wall-clock publish time of traced messages.
    probes: dict[int, float] = field(default_factory=dict)

    def publish(self, count: int, rate: float | None, window: int = 500) -> range:
        first = self.next_seq
        self.next_seq += count
        asyncio.run(self._publish(range(first, first + count), rate, window))
        return range(first, first + count)

    async def _publish(self, seqs: range, rate: float | None, window: int) -> None:
        nc = await connect(JetStreamOptions(url=self.url, name="bench-publisher"))
        js = nc.jetstream(timeout=2)
        started = time.monotonic()
        try:
            for start in range(seqs.start, seqs.stop, window):
                chunk = range(start, min(start + window, seqs.stop))
                await asyncio.gather(*(self._one(js, seq) for seq in chunk))
                if rate:
                    ahead = started + (chunk.stop - seqs.start) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            await nc.close()

    async def _one(self, js: Any, seq: int) -> None:
        device = self.devices[seq % len(self.devices)]
        now = datetime.now(UTC)
        body = orjson.dumps({"state": "active", "ts": now.isoformat(), "seq": seq})
        if seq % _PROBE_EVERY == 0:
            self.probes[seq] = now.timestamp()
        while True:
            try:
                await js.publish(
                    f"devmeter.v2.{ACCOUNT}.{device}.heartbeat",
                    body,
                    headers={"Nats-Msg-Id": f"bench-{seq}"},
                )
                return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                self.retries += 1
                await asyncio.sleep(0.1)


class Worker:
    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.env = name, env
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = workdir

    def start(self) -> Worker:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devmeter", "ingest"],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while "JetStream consumer" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Bench:
    def __init__(self, opts: Options, workdir: Path, stack: ExitStack) -> None:
        self.opts, self.workdir = opts, workdir
        name = f"devmeter_benchjs_{secrets.token_hex(4)}"
        with psycopg.connect(opts.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        stack.callback(_drop_database, opts.database_url, name)
        self.dbname = name
        self.database_url = psycopg.conninfo.make_conninfo(opts.database_url, dbname=name)
        migrate(self.database_url)
        at = datetime.now(UTC) - timedelta(days=1)
        with psycopg.connect(self.database_url, row_factory=psycopg.rows.dict_row) as conn:
            ensure_fleet(
                conn,
                load_catalog(),
                account_ref=ACCOUNT,
                device_class="lte-m",
                prefix=PREFIX,
                devices=opts.devices,
                at=at,
            )
            conn.commit()
        devices = [d.id for d in fleet_ids(PREFIX, opts.devices, 0, 0.0)[1]]
        self.cluster = NatsCluster(workdir / "nats", size=3)
        self.cluster.start()
        stack.callback(self.cluster.stop)
        self.js = JetStreamOptions(url=self.cluster.url, replicas=3, ack_wait_s=5.0)
        asyncio.run(self._create_stream())
        self.publisher = Publisher(self.cluster.url, devices)
        self.workers: list[Worker] = []
        stack.callback(self.stop_workers)

    async def _create_stream(self) -> None:
        nc = await connect(self.js)
        try:
            for _ in range(120):
                try:
                    await ensure_stream(nc.jetstream(timeout=5), self.js)
                    return
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def worker_env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMETER_")}
        return env | {
            "DEVMETER_DATABASE_URL": self.database_url,
            "DEVMETER_INGEST_SOURCE": "jetstream",
            "DEVMETER_NATS_URL": self.cluster.url,
            "DEVMETER_JETSTREAM_REPLICAS": "3",
            "DEVMETER_JETSTREAM_ACK_WAIT_S": "5",
            "DEVMETER_INGEST_CLIENT_ID": name,
            "DEVMETER_DATA_DIR": str(self.workdir / "data"),
        }

    def ensure_workers(self, n: int) -> None:
        self.workers = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        while len(self.workers) < n:
            name = f"worker-{secrets.token_hex(2)}"
            self.workers.append(Worker(name, self.worker_env(name), self.workdir).start())
        while len(self.workers) > n:
            self.workers.pop().stop()

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()

    def counts(self, seqs: range) -> tuple[int, int]:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT (device_id, time, seq)) FROM heartbeats "
                "WHERE seq >= %s AND seq < %s",
                (seqs.start, seqs.stop),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def wait_stored(self, seqs: range, timeout: float = 300.0) -> float:
        """Until every seq of ``seqs`` is stored; returns the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.counts(seqs)[1] >= len(seqs):
                return time.monotonic()
            time.sleep(_POLL_S * 5)
        raise RuntimeError(f"not all of {seqs} stored after {timeout}s: {self.counts(seqs)}")

    def meter(self) -> CpuMeter:
        return CpuMeter(
            {
                "workers": lambda: [w.proc.pid for w in self.workers if w.proc is not None],
                "nats": lambda: [n.proc.pid for n in self.cluster.nodes if n.alive()],  # type: ignore[union-attr]
                "postgres": lambda: postgres_pids(self.dbname),
                # The publisher and the latency poller run in this process.
                "bench": lambda: [os.getpid()],
            }
        )

    def throughput(self, workers: int) -> Phase:
        self.ensure_workers(workers)
        n = self.opts.messages
        meter = self.meter()
        meter.start()
        t0 = time.monotonic()
        seqs = self.publisher.publish(n, None)
        done = self.wait_stored(seqs)
        cpu = meter.stop()
        stored, distinct = self.counts(seqs)
        seconds = done - t0
        return Phase(
            f"throughput, {workers} worker{'s' if workers > 1 else ''}",
            workers,
            n,
            stored,
            distinct,
            seconds,
            n / seconds,
            worker_cpu_us_per_msg=1e6 * cpu["workers"] * cpu["seconds"] / n,
            nats_cpu_us_per_msg=1e6 * cpu["nats"] * cpu["seconds"] / n,
            note=f"cores busy: machine {cpu['machine']:.1f}, workers {cpu['workers']:.1f}, "
            f"NATS {cpu['nats']:.1f}, PostgreSQL {cpu['postgres']:.1f}, publisher "
            f"{cpu['bench']:.1f}, not ours {cpu['not ours']:.1f}",
        )

    def latency(self, workers: int) -> Phase:
        self.ensure_workers(workers)
        rate, seconds = self.opts.rate, self.opts.latency_seconds
        n = int(rate * seconds)
        first = self.publisher.next_seq
        seen: dict[int, float] = {}
        stop = threading.Event()

        def poll() -> None:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                while not stop.is_set():
                    probes = self.publisher.probes
                    todo = [s for s in list(probes) if s >= first and s not in seen][:200]
                    if todo:
                        rows = conn.execute(
                            "SELECT seq FROM heartbeats WHERE seq = ANY(%s)", (todo,)
                        ).fetchall()
                        now = time.time()
                        for (seq,) in rows:
                            seen[int(seq)] = now
                    time.sleep(_POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.monotonic()
        seqs = self.publisher.publish(n, rate)
        done = self.wait_stored(seqs)
        time.sleep(_POLL_S * 5)
        stop.set()
        poller.join(10)
        lat = sorted(
            1000 * (seen[s] - self.publisher.probes[s])
            for s in seqs
            if s in seen and s in self.publisher.probes
        )
        stored, distinct = self.counts(seqs)
        return Phase(
            f"latency at {rate:.0f} msg/s, {workers} worker{'s' if workers > 1 else ''}",
            workers,
            n,
            stored,
            distinct,
            done - t0,
            n / (done - t0),
            p50_ms=statistics.median(lat) if lat else None,
            p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            note=f"{len(lat)} traced",
        )

    def fault(self, what: str) -> Phase:
        self.ensure_workers(2)
        n = self.opts.messages
        retries_before = self.publisher.retries
        killed: list[str] = []
        seqs_box: list[range] = []

        def publish() -> None:
            seqs_box.append(self.publisher.publish(n, self.opts.rate * 2))

        first = self.publisher.next_seq
        t0 = time.monotonic()
        publishing = threading.Thread(target=publish, daemon=True)
        publishing.start()
        # Mid-run: a quarter of the messages are stored.
        deadline = time.monotonic() + 120
        while self.counts(range(first, first + n))[1] < n // 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        if what == "worker":
            victim = self.workers.pop(0)
            victim.kill()
            killed.append(victim.name)
        else:
            leader = asyncio.run(self._stream_leader())
            self.cluster.kill(self.cluster.node(leader))
            killed.append(f"node {leader} (stream leader)")
        at_kill = self.counts(range(first, first + n))[1]
        publishing.join(600)
        seqs = seqs_box[0]
        done = self.wait_stored(seqs)
        stored, distinct = self.counts(seqs)
        if what != "worker":
            node = self.cluster.node(killed[0].split()[1])
            self.cluster.start_node(node)
        return Phase(
            f"{what} SIGKILLed mid-run, 2 workers",
            2,
            n,
            stored,
            distinct,
            done - t0,
            n / (done - t0),
            publish_retries=self.publisher.retries - retries_before,
            note=f"killed {killed[0]} with {at_kill} of {n} stored",
        )

    async def _stream_leader(self) -> str:
        nc = await connect(self.js)
        try:
            info = await nc.jetstream(timeout=5).stream_info(self.js.stream)
            assert info.cluster is not None
            return str(info.cluster.leader)
        finally:
            await nc.close()


def render(phases: list[Phase], header: dict[str, str]) -> str:
    lines = ["# ingest over NATS JetStream", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "| phase | msg/s | p50 ms | p99 ms | worker CPU µs/msg | NATS CPU µs/msg | lost | "
        "doubled | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(v: float | None, fmt: str = ".0f") -> str:
        return "" if v is None else format(v, fmt)

    for p in phases:
        note = p.note + (f"; {p.publish_retries} publish retries" if p.publish_retries else "")
        lines.append(
            f"| {p.name} | {p.msg_per_s:,.0f} | {f(p.p50_ms)} | {f(p.p99_ms)} | "
            f"{f(p.worker_cpu_us_per_msg)} | {f(p.nats_cpu_us_per_msg)} | {p.lost} | "
            f"{p.doubled} | {note} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    if NATS_SERVER is None:
        say("nats-server is not installed (Debian: apt-get install nats-server)")
        return 1
    version = subprocess.run(
        [NATS_SERVER, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="devmeter-bench-js-") as tmp, ExitStack() as stack:
        bench = Bench(opts, Path(tmp), stack)
        steps: list[tuple[str, Callable[[], Phase]]] = [
            ("throughput, 1 worker", lambda: bench.throughput(1)),
            ("latency, 1 worker", lambda: bench.latency(1)),
            ("throughput, 2 workers", lambda: bench.throughput(2)),
            ("latency, 2 workers", lambda: bench.latency(2)),
            ("worker killed", lambda: bench.fault("worker")),
            ("node killed", lambda: bench.fault("node")),
        ]
        for name, step in steps:
            say(f"{name} ...")
            phase = step()
            say(f"{name}: {phase.msg_per_s:,.0f} msg/s, lost {phase.lost}, doubled {phase.doubled}")
            phases.append(phase)
    header = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "nats": f"{version}, 3 nodes on loopback, stream replicas 3, file storage",
        "cpus": str(os.cpu_count()),
        "messages per throughput/fault phase": str(opts.messages),
        "devices": str(opts.devices),
    }
    print(render(phases, header))
    if opts.json_path:
        out = {
            "header": header,
            "phases": [asdict(p) | {"lost": p.lost, "doubled": p.doubled} for p in phases],
        }
        opts.json_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(p.lost == 0 and p.doubled == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
