"""Ingest through NATS JetStream: a 3-node cluster on loopback, workers as processes.

A worker SIGKILLed mid-stream and a NATS node SIGKILLed mid-stream: every heartbeat published
is stored exactly once. Also: replay from the log, MQTT devices through NATS's MQTT listener,
and device users that may publish only their own subject.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import orjson
import psycopg
import pytest

from ingest.broker_auth import Credential
from ingest.jetstream import JetStreamOptions, connect, ensure_stream
from ingest.nats_auth import render_authorization
from tests.conftest import seed_fleet
from tests.integration.test_ingest_resilience import WorkerProcess, assert_exactly_once, stored
from tests.integration.test_ingest_worker import Publisher, count, poll
from tests.nats import NATS_SERVER, NatsCluster

DEVICES = 100
BASE = datetime.now(UTC) - timedelta(hours=2)
READY = "JetStream consumer"

pytestmark = [
    pytest.mark.skipif(
        NATS_SERVER is None,
        reason="nats-server is not installed (Debian: apt-get install nats-server)",
    ),
    # The suite's own NATS cluster either way: CI's second pass (PostgreSQL 18) leaves it out.
    pytest.mark.one_pass,
]


def subject(uid: str, n: int) -> str:
    return f"devmeter.v2.acme.s{uid}-{n % DEVICES}.heartbeat"


def payload(i: int) -> bytes:
    return orjson.dumps(
        {
            "state": "active" if (i // DEVICES) % 3 else "inactive",
            "ts": (BASE + timedelta(milliseconds=i)).isoformat(),
            "seq": i,
        }
    )


class NatsStream(threading.Thread):
    """Publishes `total` heartbeats to JetStream, each until the stream acknowledges it.

    A publish that gets no PubAck (its node died, a leader is being elected) is sent again
    with the same Nats-Msg-Id, as a careful device would: the stream keeps one of the two.
    """

    def __init__(self, url: str, uid: str, total: int, *, rate: float = 2_000.0) -> None:
        super().__init__(daemon=True)
        self.url, self.uid, self.total, self.rate = url, uid, total, rate
        self.sent = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        nc = await connect(JetStreamOptions(url=self.url, name="test-publisher"))
        js = nc.jetstream(timeout=2)
        chunk = 100
        started = time.monotonic()
        try:
            for start in range(0, self.total, chunk):
                end = min(start + chunk, self.total)
                await asyncio.gather(*(self._one(js, i) for i in range(start, end)))
                self.sent = end
                ahead = started + end / self.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await nc.close()

    async def _one(self, js: nats.js.JetStreamContext, i: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                await js.publish(
                    subject(self.uid, i), payload(i), headers={"Nats-Msg-Id": f"{self.uid}-{i}"}
                )
                return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.2)


def js_options(cluster: NatsCluster, replicas: int) -> JetStreamOptions:
    return JetStreamOptions(url=cluster.url, replicas=replicas, ack_wait_s=3.0)


def create_stream(options: JetStreamOptions) -> None:
    async def go() -> None:
        nc = await connect(options)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await ensure_stream(nc.jetstream(timeout=5), options)
                    return
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                    # A cluster that just started may not have elected its meta leader yet.
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    asyncio.run(go())


def stream_leader(options: JetStreamOptions) -> tuple[str, str]:
    """(stream leader, consumer leader): the servers whose death matters most."""

    async def go() -> tuple[str, str]:
        nc = await connect(options)
        try:
            js = nc.jetstream(timeout=5)
            stream = await js.stream_info(options.stream)
            consumer = await js.consumer_info(options.stream, options.consumer)
            assert stream.cluster is not None
            assert consumer.cluster is not None
            return str(stream.cluster.leader), str(consumer.cluster.leader)
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def fleet(database_url: str, uid: str) -> None:
    seed_fleet(
        database_url,
        [(f"s{uid}-{n}", "lte-m", None) for n in range(DEVICES)],
        BASE - timedelta(days=1),
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats", size=3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def worker_env(
    cli_env: dict[str, str], database_url: str, cluster: NatsCluster, uid: str, name: str
) -> dict[str, str]:
    return {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_INGEST_SOURCE": "jetstream",
        "DEVMETER_NATS_URL": cluster.url,
        "DEVMETER_JETSTREAM_REPLICAS": "3",
        # A killed worker's messages go to the other one after this long.
        "DEVMETER_JETSTREAM_ACK_WAIT_S": "3",
        "DEVMETER_INGEST_CLIENT_ID": f"{name}-{uid}",
        "DEVMETER_INGEST_MAX_INFLIGHT": "1000",
        "DEVMETER_INGEST_BATCH_SIZE": "500",
        "DEVMETER_INGEST_BATCH_AGE_MS": "50",
        "DEVMETER_INGEST_LOG_INTERVAL_S": "1",
    }


@pytest.fixture
def workers(
    cli_env: dict[str, str], database_url: str, cluster: NatsCluster, uid: str, tmp_path: Path
) -> Iterator[list[WorkerProcess]]:
    create_stream(js_options(cluster, 3))
    started = []
    try:
        for name in ("w1", "w2"):
            w = WorkerProcess(
                worker_env(cli_env, database_url, cluster, uid, name), tmp_path, READY
            )
            w.start()
            started.append(w)
        yield started
    finally:
        for w in started:
            w.stop()


@pytest.mark.usefixtures("fleet")
def test_worker_sigkilled_mid_stream_loses_nothing_and_doubles_nothing(
    database_url: str, cluster: NatsCluster, uid: str, workers: list[WorkerProcess]
) -> None:
    total = 12_000
    stream = NatsStream(cluster.url, uid, total)
    stream.start()
    poll(lambda: stored(database_url) >= 2_000, 120, "2,000 heartbeats before the kill")

    workers[0].kill()
    at_kill = stored(database_url)
    assert at_kill < total, "the kill came after the stream was stored"

    stream.join(180)
    assert stream.error is None, stream.error
    assert stream.sent == total
    poll(lambda: stored(database_url) >= total, 120, f"all {total} heartbeats")
    assert_exactly_once(database_url, total)
    survivor = workers[1].stop()
    assert "Traceback" not in survivor, survivor


@pytest.mark.usefixtures("fleet")
def test_nats_node_sigkilled_mid_stream_loses_nothing_and_doubles_nothing(
    database_url: str, cluster: NatsCluster, uid: str, workers: list[WorkerProcess]
) -> None:
    total = 12_000
    stream = NatsStream(cluster.url, uid, total)
    stream.start()
    poll(lambda: stored(database_url) >= 2_000, 120, "2,000 heartbeats before the kill")

    # The stream's leader: its death makes the others elect one while publishes and pulls go on.
    leader, _consumer_leader = stream_leader(js_options(cluster, 3))
    cluster.kill(cluster.node(leader))
    at_kill = stored(database_url)
    assert at_kill < total, "the kill came after the stream was stored"

    stream.join(180)
    assert stream.error is None, stream.error
    assert stream.sent == total
    poll(lambda: stored(database_url) >= total, 120, f"all {total} heartbeats")
    assert_exactly_once(database_url, total)
    for w in workers:
        assert w.proc is not None
        assert w.proc.poll() is None, w.log.read_text()

    # The dead node comes back and catches up; the log is whole on it too.
    cluster.start_node(cluster.node(leader))
    assert cluster.node(leader).healthy()


@pytest.fixture
def single(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats1", size=1, mqtt=True)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devmeter", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("fleet")
def test_replay_restores_lost_heartbeats_and_twice_stores_nothing_new(
    cli_env: dict[str, str],
    database_url: str,
    owner_database_url: str,
    single: NatsCluster,
    uid: str,
    tmp_path: Path,
) -> None:
    total = 1_000
    options = js_options(single, 1)
    create_stream(options)
    w = WorkerProcess(worker_env(cli_env, database_url, single, uid, "w"), tmp_path, READY)
    w.start()
    try:
        stream = NatsStream(single.url, uid, total, rate=10_000)
        stream.start()
        stream.join(60)
        assert stream.error is None, stream.error
        poll(lambda: stored(database_url) >= total, 60, f"all {total} heartbeats")
    finally:
        w.stop()
    rows = "SELECT device_id, time, seq, state, received_at FROM heartbeats ORDER BY seq"
    with psycopg.connect(database_url) as conn:
        before = conn.execute(rows).fetchall()

    # A restore that lost the newest half.
    with psycopg.connect(owner_database_url) as conn:
        conn.execute("DELETE FROM heartbeats WHERE seq >= %s", (total // 2,))
    assert stored(database_url) == total // 2

    env = worker_env(cli_env, database_url, single, uid, "replay")
    since = (BASE - timedelta(days=1)).isoformat()
    first = run_cli(env, tmp_path, "ingest", "replay", "--since", since)
    assert first.returncode == 0, first.stderr
    out = orjson.loads(first.stdout)
    assert out["messages"] == total
    assert out["heartbeats_stored"] == total - total // 2
    assert out["already_stored"] == total // 2
    assert "replay:" in first.stderr
    with psycopg.connect(database_url) as conn:
        # The same rows, received_at included: it is when the stream stored each message.
        assert conn.execute(rows).fetchall() == before

    second = run_cli(env, tmp_path, "ingest", "replay", "--since", since)
    assert second.returncode == 0, second.stderr
    assert orjson.loads(second.stdout)["heartbeats_stored"] == 0
    assert_exactly_once(database_url, total)

    # --since after everything: nothing to read.
    later = run_cli(env, tmp_path, "ingest", "replay", "--since", datetime.now(UTC).isoformat())
    assert later.returncode == 0, later.stderr
    assert orjson.loads(later.stdout)["messages"] == 0


@pytest.mark.usefixtures("fleet")
def test_mqtt_device_through_nats_mqtt_listener_is_stored(
    cli_env: dict[str, str], database_url: str, single: NatsCluster, uid: str, tmp_path: Path
) -> None:
    create_stream(js_options(single, 1))
    w = WorkerProcess(worker_env(cli_env, database_url, single, uid, "w"), tmp_path, READY)
    w.start()
    try:
        node = single.nodes[0]
        # NATS's MQTT listener speaks MQTT 3.1.1.
        mqtt = Publisher(f"mqtt://127.0.0.1:{node.mqtt_port}?protocol=3.1.1")
        try:
            for i in range(5):
                mqtt.publish(f"devmeter/v2/acme/s{uid}-{i}/heartbeat", payload(i))
        finally:
            mqtt.close()
        poll(lambda: stored(database_url) >= 5, 30, "the MQTT heartbeats")
    finally:
        w.stop()
    assert_exactly_once(database_url, 5)
    sql = "SELECT count(*) FROM heartbeats WHERE device_id = %s"
    assert count(database_url, sql, f"s{uid}-3") == 1


def test_device_users_publish_only_their_own_subject(tmp_path: Path) -> None:
    credentials = [
        Credential("acme/d1", "key-d1-0123456789", False),
        Credential("acme/gw", "key-gw-0123456789", True),
    ]
    auth = render_authorization(credentials, {"devmeter-ingest": "ingest-password-0123"})
    c = NatsCluster(tmp_path / "auth", size=1, extra=auth)
    c.start()
    try:
        url = c.nodes[0].url.replace("nats://", "nats://{}@")
        ingest = JetStreamOptions(url=url.format("devmeter-ingest:ingest-password-0123"))
        create_stream(ingest)

        async def publish_as(user: str, password: str, subjects: list[str]) -> list[str]:
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            nc = await nats.connect(
                c.nodes[0].url,
                user=user,
                password=password,
                error_cb=on_error,
                allow_reconnect=False,
            )
            try:
                for s in subjects:
                    await nc.publish(s, b"{}")
                await nc.flush()
                await asyncio.sleep(0.3)  # a violation is reported asynchronously
            finally:
                await nc.close()
            return errors

        async def stored_subjects() -> dict[str, int]:
            nc = await connect(ingest)
            try:
                info = await nc.jetstream().stream_info(ingest.stream, subjects_filter=">")
                return dict(info.state.subjects or {})
            finally:
                await nc.close()

        own, other = "devmeter.v2.acme.d1.heartbeat", "devmeter.v2.acme.d2.heartbeat"
        gw_own, gw_as_device = "devmeter.v2.acme.gw.gateway", "devmeter.v2.acme.gw.heartbeat"
        errors = asyncio.run(publish_as("acme/d1", "key-d1-0123456789", [own, other]))
        assert any("permissions violation" in e.lower() for e in errors), errors
        errors = asyncio.run(publish_as("acme/gw", "key-gw-0123456789", [gw_own, gw_as_device]))
        assert any("permissions violation" in e.lower() for e in errors), errors
        with warnings.catch_warnings():
            # nats-py leaves the refused connection's socket to the garbage collector.
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises(nats.errors.Error):
                asyncio.run(publish_as("acme/d1", "wrong-key", [own]))
            gc.collect()
        assert asyncio.run(stored_subjects()) == {own: 1, gw_own: 1}
    finally:
        c.stop()
