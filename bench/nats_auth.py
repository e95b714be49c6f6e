"""NATS credential sync at fleet size (issue 11, item 4): render + reload for N devices.

    ./dev bench nats_auth [--devices 100000 --accounts 100 --json FILE]

In a scratch database on DEVMETER_BENCH_DATABASE_URL (an embedded PostgreSQL if that is
unreachable; same rule as bench/close.py): N devices with credentials, made by COPY (one bcrypt
hash for all of them: nats-server checks a hash only when a client connects, so its value
changes neither the render nor the reload; hashing N keys is `metering/secrets.py`'s figure).
One private nats-server (Debian's, JetStream on, tests/nats.py) includes the rendered file.

Measured, once each:

1. ``NatsCredentialSync.write()`` at N (full read, render, atomic write) and the file's size;
   nats-server's start with N users until healthy.
2. A device registered with ``register_device`` (real bcrypt): from its commit to the sync's
   write and SIGHUP (an incremental read, as on NOTIFY), to nats-server's "Reloaded server
   configuration", to a successful CONNECT with the new key; nats-server's CPU for the reload
   and its VmRSS.

No clients but the probe are connected: a reload also checks every connected client's
password again (one bcrypt check each), which is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

import nats

from bench.close import find_server, scratch_database
from bench.provisioning import proc_cpu_s
from devmeter.db import connect
from devmeter.migrate import migrate
from ingest.nats_auth import NatsCredentialSync
from metering.catalog import load_catalog
from metering.registry import create_account, register_device
from metering.secrets import DEVICE_KEY_PREFIX, broker_hash, nats_hash, new_secret
from tests.nats import NATS_SERVER, NatsCluster

DB_NAME = "devmeter_bench_nats_auth"
INGEST_PASSWORD = "bench-ingest-password"  # noqa: S105 - a scratch server's, on loopback


def say(message: str) -> None:
    print(f"bench nats_auth: {message}", file=sys.stderr, flush=True)


def fill(url: str, devices: int, accounts: int) -> None:
    catalog = load_catalog()
    now = datetime.now(UTC)
    with connect(url) as conn:
        ids = [
            create_account(
                conn, catalog, ref=f"a{n:04d}", name=f"a{n}", plan="standard", country="JP",
                timezone="Asia/Tokyo", signed_up_on=date(2026, 1, 1),
            ).account.id
            for n in range(accounts)
        ]  # fmt: skip
        mqtt_hash, bcrypt_hash = broker_hash("dmk_bench"), nats_hash("dmk_bench")
        rows = []
        for i in range(devices):
            key = new_secret(DEVICE_KEY_PREFIX)
            rows.append((f"dev-{i:07d}", ids[i % accounts], key.prefix, key.digest))
        with conn.cursor() as cur:
            with cur.copy(
                "COPY devices (id, account_id, device_class, key_prefix, key_hash,"
                " registered_at, state, state_at) FROM STDIN"
            ) as copy:
                for d, a, prefix, digest in rows:
                    copy.write_row((d, a, "lte-m", prefix, digest, now, "active", now))
            with cur.copy(
                "COPY device_credentials (account_id, device_id, broker_hash, nats_hash,"
                " key_issued_at) FROM STDIN"
            ) as copy:
                for d, a, _prefix, _digest in rows:
                    copy.write_row((a, d, mqtt_hash, bcrypt_hash, now))
        conn.commit()


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def connects(url: str, user: str, key: str) -> bool:
    try:
        nc = await nats.connect(url, user=user, password=key, allow_reconnect=False)
    except Exception:
        return False
    await nc.close()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if NATS_SERVER is None:
        sys.exit("nats-server is not installed (apt-get install nats-server)")
    figures: dict[str, object] = {"devices": args.devices, "load1_start": os.getloadavg()[0]}
    server = find_server()
    with tempfile.TemporaryDirectory(prefix="devmeter-bench-nats-") as work, scratch_database(
        server.url, DB_NAME
    ) as url:  # fmt: skip
        folder = Path(work)
        migrate(url)
        started = time.perf_counter()
        fill(url, args.devices, args.accounts)
        say(f"{args.devices:,} devices in {time.perf_counter() - started:.1f} s")

        sync = NatsCredentialSync(
            url, folder / "auth", reload=lambda: None, ingest_password=INGEST_PASSWORD
        )
        started = time.perf_counter()
        sync.write()
        figures["full_write_s"] = round(time.perf_counter() - started, 3)
        figures["file_mb"] = round(sync.auth_file.stat().st_size / 1e6, 1)
        say(f"full write: {figures['full_write_s']} s, {figures['file_mb']} MB")

        cluster = NatsCluster(folder / "nats", size=1)
        node = cluster.nodes[0]
        include = os.path.relpath(sync.auth_file, node.folder)
        cluster.extra = f'include "{include}"\n'
        started = time.perf_counter()
        cluster.start(timeout=300)
        figures["server_start_s"] = round(time.perf_counter() - started, 3)
        assert node.proc is not None
        pid = node.proc.pid
        try:
            figures["server_rss_mib"] = round(vm_rss_mib(pid), 1)
            done_lines = node.log.read_text().count("Reloaded server configuration")
            sync.reload = lambda: os.kill(pid, 1)  # SIGHUP, as signal_reload sends
            sync.write()  # the sync's first full read, as `broker nats` starts with

            with connect(url) as conn:
                key = register_device(
                    conn, load_catalog(), account_ref="a0000", device_class="lte-m",
                    device_id="probe", at=datetime.now(UTC),
                ).key  # fmt: skip
                conn.commit()
            committed = time.perf_counter()
            cpu_before = proc_cpu_s(pid)
            assert sync.sync(full=False), "the registration changed nothing"
            signalled = time.perf_counter()
            deadline = time.monotonic() + 300
            while node.log.read_text().count("Reloaded server configuration") == done_lines:
                if time.monotonic() > deadline:
                    sys.exit("nats-server did not reload within 300 s")
                time.sleep(0.01)
            reloaded = time.perf_counter()
            cpu_after = proc_cpu_s(pid)
            ok = asyncio.run(connects(node.url, "a0000/probe", key))
            admitted = time.perf_counter()
            if not ok:
                sys.exit("the new device was refused after the reload")
            figures |= {
                "commit_to_sighup_s": round(signalled - committed, 3),
                "sighup_to_reloaded_s": round(reloaded - signalled, 3),
                "commit_to_connect_s": round(admitted - committed, 3),
                "reload_cpu_s": round(cpu_after - cpu_before, 2),
                "server_rss_after_mib": round(vm_rss_mib(pid), 1),
            }
        finally:
            cluster.stop()
    figures["load1_end"] = os.getloadavg()[0]
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
