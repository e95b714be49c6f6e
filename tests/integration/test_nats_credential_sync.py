"""Device credentials and subject rights at a real nats-server, kept by `devmeter broker nats`.

A device registered through devmeter publishes its own heartbeat subject with its key, natively
and over NATS's MQTT listener, and the heartbeat is stored by `devmeter ingest` reading
JetStream; it may publish nothing else and subscribe to nothing; a wrong key is refused; a
rotated key is refused once the sync has reloaded the server, and the new one works.

What must not be stored is checked with a fence: the device publishes the forbidden message
first and a permitted one after it on the same connection; the server handles a connection's
messages in order, so once the permitted one is in the stream the forbidden one would be too.
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import signal
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.broker_auth import INGEST_USERNAME
from ingest.jetstream import JetStreamOptions, connect
from tests.conftest import Cli
from tests.integration.test_ingest_jetstream import READY, create_stream
from tests.integration.test_ingest_resilience import WorkerProcess
from tests.integration.test_ingest_worker import count, poll
from tests.nats import NATS_SERVER, NatsCluster

pytestmark = [
    pytest.mark.skipif(
        NATS_SERVER is None,
        reason="nats-server is not installed (Debian: apt-get install nats-server)",
    ),
    # The suite's own NATS cluster either way: CI's second pass (PostgreSQL 18) leaves it out.
    pytest.mark.one_pass,
]

INGEST_PASSWORD = "ingest-" + uuid.uuid4().hex
OWN = "devmeter.v2.acme.d1.heartbeat"
OTHER = "devmeter.v2.acme.d2.heartbeat"


def beat(seq: int) -> bytes:
    return orjson.dumps({"state": "active", "ts": datetime.now(UTC).isoformat(), "seq": seq})


class Nats:
    """One nats-server with JetStream and the MQTT listener, reading devmeter's include file."""

    def __init__(self, folder: Path, auth_file: Path, pid_file: Path) -> None:
        self.cluster = NatsCluster(folder, size=1, mqtt=True)
        self.node = self.cluster.nodes[0]
        # nats-server 2.9 reads an include relative to the including file's folder, even an
        # absolute path (it joins the two).
        include = os.path.relpath(auth_file, self.node.folder)
        self.cluster.extra = f'pid_file: "{pid_file}"\ninclude "{include}"\n'

    def url(self, user: str = INGEST_USERNAME, password: str = INGEST_PASSWORD) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.node.port}"


async def _publish(
    url: str, user: str, key: str, subjects: list[str], sub: str | None, expect: int
) -> list[str]:
    """Connect as ``user``, publish ``subjects`` in order (and subscribe to ``sub``); the
    server's asynchronous errors (permissions violations), waiting (bounded) for ``expect``."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        url, user=user, password=key, error_cb=on_error, allow_reconnect=False, connect_timeout=5
    )
    try:
        if sub is not None:
            await nc.subscribe(sub)
        for i, subject in enumerate(subjects):
            await nc.publish(subject, beat(i))
        # A PING answered means every earlier message was handled; a violation is reported
        # (as -ERR) before that PONG.
        await nc.flush(timeout=5)
        # ... usually: the server logs the violation, but its -ERR can reach the client after
        # the PONG (1 run in 3 here), so an expected one is waited for, with a bound.
        deadline = asyncio.get_running_loop().time() + 5
        while len(errors) < expect and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await nc.close()
    return errors


def publish(
    nats_: Nats,
    user: str,
    key: str,
    subjects: list[str],
    sub: str | None = None,
    *,
    expect: int = 0,
) -> list[str]:
    return asyncio.run(_publish(nats_.node.url, user, key, subjects, sub, expect))


def refused(nats_: Nats, user: str, key: str) -> bool:
    with warnings.catch_warnings():
        # nats-py leaves the refused connection's socket to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            publish(nats_, user, key, [])
        except (nats.errors.Error, OSError):
            return True
        finally:
            gc.collect()
    return False


def stream_subjects(nats_: Nats) -> dict[str, int]:
    async def go() -> dict[str, int]:
        nc = await connect(JetStreamOptions(url=nats_.url()))
        try:
            info = await nc.jetstream().stream_info("DEVMETER_HEARTBEATS", subjects_filter=">")
            return dict(info.state.subjects or {})
        finally:
            await nc.close()

    return asyncio.run(go())


def mqtt_connect(port: int, user: str, key: str) -> tuple[mqtt.Client, int]:
    """An MQTT 3.1.1 client of NATS's listener, and its CONNACK code (0: accepted)."""
    acks: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
    )
    client.username_pw_set(user, key)
    client.on_connect = lambda _c, _u, _f, rc, _p: acks.put(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        code = acks.get(timeout=10)
    except queue.Empty:
        code = -1
    return client, code


def heartbeats_of(url: str, device: str) -> int:
    return count(url, "SELECT count(*) FROM heartbeats WHERE device_id = %s", device)


@pytest.fixture
def env(cli: Cli, tmp_path: Path) -> dict[str, str]:
    return {
        **cli.env,
        "DEVMETER_INGEST_SOURCE": "jetstream",
        "DEVMETER_NATS_AUTH_FILE": str(tmp_path / "nats-auth" / "devmeter-auth.conf"),
        "DEVMETER_NATS_PID_FILE": str(tmp_path / "nats.pid"),
    }


@pytest.fixture
def sync_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`devmeter broker nats` in the foreground, as beside a production nats-server."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_devices_reach_nats_with_their_keys_and_rotation_takes_the_old_one_away(
    cli: Cli,
    env: dict[str, str],
    database_url: str,
    tmp_path: Path,
    sync_process: list[subprocess.Popen[bytes]],
) -> None:
    made = cli(
        "accounts", "create", "--ref", "acme", "--name", "ACME", "--plan", "standard",
        "--country", "JP",
    )  # fmt: skip
    assert made.code == 0, made.stderr
    keys = {}
    for device in ("d1", "d2"):
        registered = cli(
            "devices", "register", "--account", "acme", "--class", "lte-m", "--id", device
        )
        assert registered.code == 0, registered.stderr
        keys[device] = str(registered.json()["key"])  # type: ignore[index]

    nats_ = Nats(tmp_path / "nats", Path(env["DEVMETER_NATS_AUTH_FILE"]), tmp_path / "nats.pid")
    env["DEVMETER_NATS_URL"] = nats_.url()
    once = Cli(env, tmp_path)("broker", "nats", "--once")
    assert once.code == 0, once.stderr
    # Written before the server starts, which must find the file it includes; no server yet.
    assert once.json() == {  # type: ignore[comparison-overlap]
        **once.json(),  # type: ignore[dict-item]
        "devices": 2, "without_nats_hash": 0, "written": True, "servers_reloaded": 0,
    }  # fmt: skip
    nats_.cluster.start()
    log = tmp_path / "nats-sync.log"
    try:
        with log.open("wb") as out:
            sync_process.append(
                subprocess.Popen(
                    [sys.executable, "-m", "devmeter", "broker", "nats"],
                    env=env,
                    cwd=tmp_path,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        poll(lambda: "keeping" in log.read_text(), 30, "the sync to start")
        create_stream(JetStreamOptions(url=nats_.url()))
        worker = WorkerProcess(
            {
                **env,
                "DEVMETER_INGEST_CLIENT_ID": "w-nats-auth",
                "DEVMETER_INGEST_BATCH_AGE_MS": "50",
            },
            tmp_path,
            READY,
        )
        worker.start()
        try:
            _check_rights(nats_, keys, database_url)
            _check_rotation(cli, nats_, keys, database_url)
        finally:
            worker_log = worker.stop()
        assert "Traceback" not in worker_log, worker_log
    finally:
        nats_.cluster.stop()
    said = log.read_text()
    assert "NATS credentials written: 2 devices" in said, said
    for key in keys.values():
        assert key not in said
        assert key not in (tmp_path / "nats" / "n0" / "nats.log").read_text()


def _check_rights(nats_: Nats, keys: dict[str, str], database_url: str) -> None:
    # Its own subject, natively: stored through JetStream and `devmeter ingest`.
    assert publish(nats_, "acme/d1", keys["d1"], [OWN]) == []
    poll(lambda: heartbeats_of(database_url, "d1") == 1, 30, "d1's heartbeat in the database")

    # Another device's subject: refused, and not in the stream after the fence.
    errors = publish(nats_, "acme/d1", keys["d1"], [OTHER, OWN], expect=1)
    assert any("permissions violation" in e.lower() for e in errors), errors
    poll(lambda: heartbeats_of(database_url, "d1") == 2, 30, "the fence")
    assert stream_subjects(nats_) == {OWN: 2}

    # Subscribing to anything: refused (NATS checks at SUBSCRIBE).
    errors = publish(nats_, "acme/d1", keys["d1"], [], sub="devmeter.>", expect=1)
    assert any("permissions violation for subscription" in e.lower() for e in errors), errors

    # Wrong key, another device's key, devmeter's identity with a device key: refused.
    assert refused(nats_, "acme/d1", keys["d1"] + "x")
    assert refused(nats_, "acme/d1", keys["d2"])
    assert refused(nats_, INGEST_USERNAME, keys["d1"])

    # Over NATS's MQTT listener: the same users and rights.
    port = nats_.node.mqtt_port
    assert port is not None
    _client, code = mqtt_connect(port, "acme/d1", keys["d1"] + "x")
    _client.loop_stop()
    assert code not in (0, -1), "a wrong key is refused at CONNACK"
    client, code = mqtt_connect(port, "acme/d1", keys["d1"])
    try:
        assert code == 0
        client.publish("devmeter/v2/acme/d2/heartbeat", beat(7), qos=1).wait_for_publish(10)
        client.publish("devmeter/v2/acme/d1/heartbeat", beat(8), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    poll(lambda: heartbeats_of(database_url, "d1") == 3, 30, "d1's MQTT heartbeat")
    assert stream_subjects(nats_) == {OWN: 3}


def _check_rotation(cli: Cli, nats_: Nats, keys: dict[str, str], database_url: str) -> None:
    old = keys["d1"]
    rotated = cli("devices", "rotate-key", "--device", "d1", "--account", "acme")
    assert rotated.code == 0, rotated.stderr
    new = str(rotated.json()["key"])  # type: ignore[index]
    keys["d1-new"] = new
    # The sync reloads the server within about a second of the commit; bounded generously for
    # a loaded machine.
    poll(lambda: refused(nats_, "acme/d1", old), 10, "the old key to be refused")
    assert publish(nats_, "acme/d1", new, [OWN]) == []
    poll(lambda: heartbeats_of(database_url, "d1") == 4, 30, "the heartbeat sent with the new key")
    # d2 was not rotated: its key still works.
    assert not refused(nats_, "acme/d2", keys["d2"])
