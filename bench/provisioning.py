"""Provisioning benchmark (issue 9, part 3): register N devices and get them into the broker.

    ./dev bench provisioning [--devices 100000 --batch 1000 --sample 1000 --clients 1000
                              --gateway-share 0.01 --json FILE]

In a scratch database on DEVMETER_BENCH_DATABASE_URL (an embedded PostgreSQL if that is
unreachable; same rule as bench/close.py), and a private Mosquitto started with devmeter's
authentication (``start_broker(..., auth_dir=...)`` + ``CredentialSync``, as `devmeter up`):

1. ``broker_hash`` alone for N keys, and a plain ``COPY`` of N device rows and N registration
   events (precomputed, one transaction, in a second scratch database): the baselines.
2. ``register_device`` for a sample of devices, one transaction each (extrapolated to N), then
   the rest in transactions of ``--batch``, with the broker sync running in its own process as
   in production (LISTEN/NOTIFY, render, atomic write, SIGHUP).
3. From the commit of the last batch to a successful CONNACK for the last registered device.
4. ``CredentialSync.write()`` at N; the broker's reload at N (SIGHUP to the next CONNACK, and the
   broker's CPU time) with no clients and with ``--clients`` connected; the broker's VmRSS before
   and after loading N credentials; the password and ACL files' sizes.

Clients are raw MQTT 3.1.1 sockets (CONNECT with username and password, read CONNACK): a paho
client per connection would cost a thread each and measure paho. Progress goes to stderr, the
table to stdout. Scratch databases are dropped and the broker stopped at the end, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.close import find_server, redact, scratch_database
from devmeter.db import connect
from devmeter.embedded import EmbeddedBroker, mosquitto_user, start_broker
from devmeter.migrate import migrate
from ingest.broker_auth import CredentialSync
from ingest.protocol import mqtt_username
from metering.catalog import load_catalog
from metering.registry import create_account, register_device
from metering.secrets import DEVICE_KEY_PREFIX, broker_hash, new_secret

DB_PREFIX = "devmeter_bench_prov_"
CLASSES = ("lte-m", "wifi")
TICK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"bench provisioning: {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- processes


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def find_mosquitto(config: Path) -> tuple[int, int]:
    """(mosquitto's pid, its supervisor's pid): the process running ``-c config``."""
    wanted = str(config).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"mosquitto") and wanted in argv:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return int(entry.name), int(stat[1])
        except OSError:
            continue
    raise RuntimeError(f"no mosquitto process runs {config}")


# --------------------------------------------------------------------------- raw MQTT clients


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(username: str, password: str) -> bytes:
    # MQTT 3.1.1, clean session, username + password, keep-alive 0 (no PINGREQ needed).
    variable = _mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 0)
    payload = _mqtt_string(username) + _mqtt_string(username) + _mqtt_string(password)
    body = variable + payload
    return b"\x10" + _remaining_length(len(body)) + body


def mqtt_connect(port: int, username: str, password: str, *, keep: bool = False) -> Any:
    """CONNACK's return code (0 = accepted), or the open socket when ``keep`` and accepted."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(connect_packet(username, password))
        ack = b""
        while len(ack) < 4:
            chunk = sock.recv(4 - len(ack))
            if not chunk:
                return -1  # closed without CONNACK
            ack += chunk
        code = ack[3]
        if keep and code == 0:
            kept, sock = sock, None
            return kept
        return code
    finally:
        if sock is not None:
            sock.close()


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# --------------------------------------------------------------------------- broker sync process


def _sync_child(
    url: str,
    directory: str,
    mosquitto_pid: int,
    ingest_password: str,
    owner: str | None,
    events: Any,
    stop: Any,
) -> None:
    """CredentialSync.run in its own process, as beside the API in production; every write and
    reload is reported to the parent as (start, end, changed, reload_sent) wall-clock times."""
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def reload() -> None:
        os.kill(mosquitto_pid, signal.SIGHUP)  # what EmbeddedBroker.reload sends

    sync = CredentialSync(
        url, Path(directory), reload=reload, ingest_password=ingest_password, owner=owner
    )
    write = sync.write

    def timed_write(conn: Any = None, *, full: bool = True) -> bool:
        started = time.time()
        changed = write(conn, full=full)
        events.put((started, time.time(), changed))
        return changed

    sync.write = timed_write  # type: ignore[method-assign]
    flag = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), flag.set()), daemon=True).start()
    sync.run(flag)


# --------------------------------------------------------------------------- measurements


@dataclass
class Figures:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, label: str, value: float | int | str, unit: str = "") -> None:
        self.data[key] = value
        text = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"
        self.rows.append((label, text, unit))
        say(f"{label}: {text} {unit}")


def fleet_plan(n: int, gateway_share: float) -> list[str]:
    """Device classes in registration order: every k-th a gateway, the rest lte-m/wifi."""
    every = round(1 / gateway_share) if gateway_share > 0 else 0
    return ["gateway" if every and i % every == every - 1 else CLASSES[i % 2] for i in range(n)]


def make_accounts(url: str, count: int) -> list[str]:
    catalog = load_catalog()
    refs = [f"bench-{i:05d}" for i in range(1, count + 1)]
    with connect(url) as conn, conn.transaction():
        for ref in refs:
            create_account(
                conn,
                catalog,
                ref=ref,
                name=ref,
                plan="standard",
                country="JP",
                timezone="Asia/Tokyo",
                signed_up_on=date(2026, 1, 1),
            )
    return refs


def time_hash_alone(n: int, figures: Figures) -> float:
    keys = [new_secret(DEVICE_KEY_PREFIX).plaintext for _ in range(n)]
    started = time.perf_counter()
    for key in keys:
        broker_hash(key)
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n):
        new_secret(DEVICE_KEY_PREFIX)
    keygen = time.perf_counter() - started
    figures.add("broker_hash_s", f"broker_hash alone, {n:,} keys", hashed, "s")
    figures.add("keygen_s", f"key generation + SHA-256 alone, {n:,} keys", keygen, "s")
    return hashed


def time_copy_baseline(
    server_url: str, base: str, n: int, accounts: int, figures: Figures
) -> float:
    """N device rows and N registration events by COPY, one transaction, into a fresh schema."""
    with scratch_database(server_url, base + "_copy") as url:
        migrate(url)
        refs = make_accounts(url, accounts)
        with connect(url) as conn:
            ids = [
                int(str(r["id"]))
                for r in conn.execute(
                    "SELECT id FROM accounts WHERE ref = ANY(%s) ORDER BY ref", (refs,)
                )
            ]
        hashed = broker_hash("dmk_placeholder")
        now = datetime.now(UTC)
        classes = fleet_plan(n, figures.data["gateway_share"])
        devices = []
        for i, device_class in enumerate(classes):
            key = new_secret(DEVICE_KEY_PREFIX)
            devices.append(
                (
                    "dev-" + secrets.token_hex(8),
                    ids[i % len(ids)],
                    device_class,
                    key.prefix,
                    key.digest,
                    now,
                    "active",
                    now,
                )
            )
        say(f"COPY baseline: {n:,} rows prepared")
        with connect(url) as conn:
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(
                    "COPY devices (id, account_id, device_class, key_prefix, key_hash,"
                    " registered_at, state, state_at) FROM STDIN"
                ) as copy:
                    for row in devices:
                        copy.write_row(row)
                with cur.copy(
                    "COPY device_credentials (account_id, device_id, broker_hash, key_issued_at)"
                    " FROM STDIN"
                ) as copy:
                    for d in devices:
                        copy.write_row((d[1], d[0], hashed, now))
                with cur.copy(
                    "COPY device_state_events (time, device_id, account_id, device_class, state,"
                    " source) FROM STDIN"
                ) as copy:
                    for d in devices:
                        copy.write_row((now, d[0], d[1], d[2], "active", "registration"))
            elapsed = time.perf_counter() - started
    figures.add(
        "copy_s", f"COPY {n:,} devices + {n:,} events, 1 transaction [baseline]", elapsed, "s"
    )
    return elapsed


def register(
    conn: psycopg.Connection[Any], catalog: Any, ref: str, device_class: str
) -> tuple[str, str]:
    device = register_device(
        conn, catalog, account_ref=ref, device_class=device_class, at=datetime.now(UTC)
    )
    return mqtt_username(ref, device.device.id), device.key


def wait_connack(port: int, username: str, key: str, timeout: float) -> tuple[float, int]:
    """Seconds until ``username`` is accepted, and how many CONNECTs it took."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        if mqtt_connect(port, username, key) == 0:
            return time.monotonic() - started, attempts
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{username} not accepted after {timeout:.0f} s")
        time.sleep(0.02)


@dataclass
class Broker:
    broker: EmbeddedBroker
    port: int
    pid: int
    supervisor: int


def measure_reload(b: Broker, probe: tuple[str, str], rounds: int) -> tuple[float, float, float]:
    """(median plain CONNECT->CONNACK, median SIGHUP->CONNACK, broker CPU per reload), in s.

    SIGHUP goes straight to mosquitto: its main loop re-reads the files before it serves the
    next event, so a CONNECT sent just after the signal is answered once the reload is done.
    """
    plain, after = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        assert mqtt_connect(b.port, *probe) == 0
        plain.append(time.perf_counter() - started)
    time.sleep(0.2)
    cpu_before = proc_cpu_s(b.pid)
    for _ in range(rounds):
        started = time.perf_counter()
        os.kill(b.pid, signal.SIGHUP)
        code = mqtt_connect(b.port, *probe)
        after.append(time.perf_counter() - started)
        assert code == 0, code
        time.sleep(0.3)
    cpu = (proc_cpu_s(b.pid) - cpu_before) / rounds
    return statistics.median(plain), statistics.median(after), cpu


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, server_url: str, work: Path, figures: Figures) -> None:
    n, batch = args.devices, args.batch
    sample = min(args.sample, n - 1)
    base = DB_PREFIX + secrets.token_hex(4)
    accounts = max(1, n // 1000)
    figures.data["gateway_share"] = args.gateway_share
    classes = fleet_plan(n, args.gateway_share)
    figures.add("devices", "devices", n)
    figures.add("accounts", "accounts (devices spread evenly)", accounts)
    figures.add("gateways", "of which gateways (one ACL block each)", classes.count("gateway"))
    figures.add("load_start", "load average (1 min) at start", load1())

    # 1. Baselines.
    hash_s = time_hash_alone(n, figures)
    copy_s = time_copy_baseline(server_url, base, n, accounts, figures)

    with scratch_database(server_url, base) as url:
        migrate(url)
        refs = make_accounts(url, accounts)
        catalog = load_catalog()
        last: tuple[str, str] = ("", "")
        probe: tuple[str, str] = ("", "")

        # 2a. One transaction per device, on a sample (the broker not running yet).
        with connect(url) as conn:
            started = time.perf_counter()
            for i in range(sample):
                with conn.transaction():
                    probe = register(conn, catalog, refs[i % accounts], classes[i])
            single_s = time.perf_counter() - started
        figures.add(
            "single_sample_s",
            f"register_device, 1 per transaction, {sample:,} devices",
            single_s,
            "s",
        )
        figures.add(
            "single_extrapolated_s",
            f"  extrapolated to {n:,} (linear)",
            single_s / sample * n,
            "s",
        )

        # 2b. The broker with devmeter's auth, started on the sample's credentials.
        auth_dir = work / "auth"
        ingest_password = "ingest-" + secrets.token_hex(16)
        owner = mosquitto_user() if os.geteuid() == 0 else None
        CredentialSync(
            url, auth_dir, reload=lambda: None, ingest_password=ingest_password, owner=owner
        ).write()
        broker = start_broker(work / "broker", prefer="mosquitto", auth_dir=auth_dir)
        try:
            port = int(broker.url.rsplit(":", 1)[1])
            pid, supervisor = find_mosquitto(work / "broker" / "mosquitto.conf")
            b = Broker(broker, port, pid, supervisor)
            say(f"mosquitto pid {pid} on {broker.url}")
            assert mqtt_connect(port, *probe) == 0, "a sample device is refused"
            figures.add(
                "rss_before_kib",
                f"broker VmRSS with {sample:,} credentials (before)",
                proc_status_kib(pid, "VmRSS"),
                "KiB",
            )
            ctx = mp.get_context("fork")
            events = ctx.Queue()
            stop = ctx.Event()
            child = ctx.Process(
                target=_sync_child,
                args=(url, str(auth_dir), pid, ingest_password, owner, events, stop),
                daemon=True,
            )
            child.start()
            try:
                time.sleep(1.0)  # its first sync: unchanged files, no reload
                broker_cpu0 = proc_cpu_s(pid)

                # 2c. The rest in transactions of `batch`, the sync running.
                rest = n - sample
                batch_times: list[float] = []
                # The last `clients` devices' keys, for the clients connected in step 4.
                keys: list[tuple[str, str]] = []
                load_max = load1()
                with connect(url) as conn:
                    started = time.perf_counter()
                    i = sample
                    while i < n:
                        t0 = time.perf_counter()
                        with conn.transaction():
                            for j in range(i, min(i + batch, n)):
                                last = register(conn, catalog, refs[j % accounts], classes[j])
                                if j >= n - args.clients and classes[j] != "gateway":
                                    keys.append(last)
                        committed = time.time()
                        batch_times.append(time.perf_counter() - t0)
                        i = min(i + batch, n)
                        if len(batch_times) % 10 == 0:
                            load_max = max(load_max, load1())
                            say(f"{i:,}/{n:,} registered")
                    batched_s = time.perf_counter() - started

                # 3. Last commit -> the last device accepted.
                accepted_s, attempts = wait_connack(port, *last, timeout=120)
                accepted_at = committed + accepted_s
                time.sleep(1.5)
                broker_cpu = proc_cpu_s(pid) - broker_cpu0
                sync_cpu = proc_cpu_s(child.pid) if child.pid else 0.0
            finally:
                stop.set()
                child.join(10)
                if child.is_alive():
                    child.terminate()
            writes = []
            while True:
                try:
                    writes.append(events.get(timeout=0.5))
                except Exception:  # queue.Empty from a multiprocessing queue
                    break
            changed = [w for w in writes if w[2]]
            final = [w for w in changed if w[0] >= committed - 0.05]
            figures.add(
                "batched_s",
                f"register_device, {batch:,} per transaction, {rest:,} devices (sync running)",
                batched_s,
                "s",
            )
            per_device = batched_s / rest
            figures.add("batched_per_device_ms", "  per device", per_device * 1000, "ms")
            figures.add(
                "batched_extrapolated_s", f"  at that rate, {n:,} devices", per_device * n, "s"
            )
            figures.add("batch_p50_s", "  batch time p50", statistics.median(batch_times), "s")
            figures.add("batch_max_s", "  batch time max", max(batch_times), "s")
            figures.add("load_max_batched", "  max load average (1 min) seen", load_max)
            figures.add(
                "ratio_vs_copy",
                "  ratio: batched registration / COPY",
                per_device * n / copy_s,
                "x",
            )
            figures.add(
                "hash_share",
                "  broker_hash share of batched registration",
                hash_s / (per_device * n) * 100,
                "%",
            )
            figures.add(
                "sync_writes", "sync: writes that changed the files (= SIGHUPs)", len(changed)
            )
            figures.add("sync_polls", "sync: writes in all", len(writes))
            if changed:
                durations = [w[1] - w[0] for w in changed]
                figures.add(
                    "sync_write_max_s",
                    "sync: longest write (query+render+replace)",
                    max(durations),
                    "s",
                )
            figures.add("sync_cpu_s", "sync process CPU during the run", sync_cpu, "s")
            figures.add(
                "broker_cpu_batched_s", "broker CPU during the run (reloads)", broker_cpu, "s"
            )
            figures.add(
                "last_accepted_s",
                "last commit -> last device's CONNACK accepted",
                accepted_s,
                "s",
            )
            figures.add("last_attempts", "  CONNECT attempts", attempts)
            if final:
                figures.add(
                    "last_sync_start_s",
                    "  commit -> its sync started",
                    final[0][0] - committed,
                    "s",
                )
                figures.add(
                    "last_sync_end_s",
                    "  commit -> files replaced, SIGHUP sent",
                    final[0][1] - committed,
                    "s",
                )
                figures.add(
                    "last_sighup_to_accept_s",
                    "  SIGHUP -> CONNACK (upper bound: polled every 20 ms)",
                    accepted_at - final[0][1],
                    "s",
                )

            # 4. At N: the files, the sync's write, the broker's memory and reloads.
            figures.add(
                "passwd_bytes", "password file size", (auth_dir / "passwd").stat().st_size, "bytes"
            )
            figures.add("acl_bytes", "ACL file size", (auth_dir / "acl").stat().st_size, "bytes")
            figures.add(
                "rss_after_kib",
                f"broker VmRSS with {n:,} credentials (after)",
                proc_status_kib(pid, "VmRSS"),
                "KiB",
            )
            probe_sync = CredentialSync(
                url, work / "probe", reload=lambda: None, ingest_password=ingest_password
            )
            writes_s = []
            for _ in range(3):
                probe_sync._digest = ""  # force the rewrite
                started = time.perf_counter()
                probe_sync.write()  # a full read, as at start and every minute
                writes_s.append(time.perf_counter() - started)
            with psycopg.connect(url) as conn:
                started = time.perf_counter()
                conn.execute(
                    "SELECT username, password_hash, is_gateway FROM mqtt_device_credentials"
                ).fetchall()
                query_s = time.perf_counter() - started
            figures.add(
                "write_s",
                f"CredentialSync.write() at {n:,} (median of 3)",
                statistics.median(writes_s),
                "s",
            )
            figures.add("write_query_s", "  of which the credentials query", query_s, "s")

            plain, after, cpu = measure_reload(b, probe, args.rounds)
            figures.add("connect_s", "plain CONNECT -> CONNACK (median)", plain, "s")
            figures.add(
                "reload0_s", "reload, 0 clients: SIGHUP -> next CONNACK (median)", after, "s"
            )
            figures.add("reload0_cpu_s", "  broker CPU per reload", cpu, "s")
            figures.add(
                "rss_reloaded_kib",
                f"broker VmRSS after {args.rounds} more reloads",
                proc_status_kib(pid, "VmRSS"),
                "KiB",
            )

            socks = []
            started = time.perf_counter()
            for username, key in keys:
                sock = mqtt_connect(port, username, key, keep=True)
                assert not isinstance(sock, int), sock
                socks.append(sock)
            connect_all = time.perf_counter() - started
            try:
                figures.add(
                    "clients_connect_s",
                    f"{len(socks):,} clients connected, one after another",
                    connect_all,
                    "s",
                )
                figures.add(
                    "rss_clients_kib",
                    f"broker VmRSS with {len(socks):,} clients",
                    proc_status_kib(pid, "VmRSS"),
                    "KiB",
                )
                plain_c, after_c, cpu_c = measure_reload(b, probe, args.rounds)
                figures.add("connectc_s", "  plain CONNECT -> CONNACK (median)", plain_c, "s")
                figures.add(
                    "reloadc_s",
                    f"reload, {len(socks):,} clients: SIGHUP -> next CONNACK (median)",
                    after_c,
                    "s",
                )
                figures.add("reloadc_cpu_s", "  broker CPU per reload", cpu_c, "s")
                figures.add(
                    "clients_kept",
                    "  clients still connected after the reloads",
                    sum(still_open(s) for s in socks),
                )
            finally:
                for s in socks:
                    s.close()
            figures.add(
                "rss_peak_kib",
                "broker VmHWM (peak RSS) over the run",
                proc_status_kib(pid, "VmHWM"),
                "KiB",
            )
            figures.add("load_end", "load average (1 min) at end", load1())
        finally:
            broker.stop()


def render(figures: Figures, machine: dict[str, Any], argv: list[str]) -> str:
    width = max(len(r[0]) for r in figures.rows)
    lines = [
        "Provisioning benchmark (bench/provisioning.py)",
        f"command: ./dev bench provisioning {' '.join(argv)}".rstrip(),
        *(f"{k}: {v}" for k, v in machine.items()),
        "",
        *(f"{label:<{width}}  {value:>14} {unit}" for label, value, unit in figures.rows),
    ]
    return "\n".join(lines)


def machine_info(server_url: str, origin: str) -> dict[str, Any]:
    with psycopg.connect(server_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        sync_commit = conn.execute("SHOW synchronous_commit").fetchone()
    mosquitto = subprocess.run(
        ["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "server": f"{origin}: {redact(server_url)}",
        "postgresql": f"{version[0] if version else '?'}"
        f" (synchronous_commit={sync_commit[0] if sync_commit else '?'})",
        "mosquitto": mosquitto[0] if mosquitto else "?",
        "machine": f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./dev bench provisioning", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=100_000, help="devices to register (100000)")
    p.add_argument("--batch", type=int, default=1000, help="registrations per transaction (1000)")
    p.add_argument(
        "--sample", type=int, default=1000, help="devices registered one per transaction (1000)"
    )
    p.add_argument(
        "--clients", type=int, default=1000, help="clients connected for the second reload (1000)"
    )
    p.add_argument("--gateway-share", type=float, default=0.01, help="share of gateways (0.01)")
    p.add_argument("--rounds", type=int, default=5, help="reloads timed per condition (5)")
    p.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = p.parse_args(argv)
    if args.devices < 2 or args.sample < 1 or args.batch < 1:
        p.error("--devices >= 2, --sample >= 1, --batch >= 1")
    return args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="devmeter-bench-prov-") as tmp:
        path = Path(tmp)
        path.chmod(0o755)  # mosquitto, running as its own user, reads the auth files there
        yield path


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server = find_server()
    figures = Figures()
    machine = machine_info(server.url, server.origin)
    try:
        with workdir() as work:
            run(args, server.url, work, figures)
    except KeyboardInterrupt:
        say("interrupted; scratch databases dropped, broker stopped")
        return 130
    finally:
        server.stop()
    print(render(figures, machine, raw))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **figures.data}, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
