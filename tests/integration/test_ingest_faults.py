"""Nothing acknowledged is lost: each fault, counted as publisher-acknowledged vs stored.

Every test runs its own Mosquitto (configured by ``mosquitto_config``, as ``devmeter up``'s) on
a port it keeps across restarts, and a real ``devmeter ingest`` process with the default
subscription and client id. The publisher counts a heartbeat as acknowledged when its PUBACK
arrives; after the fault, what was acknowledged is compared with what was stored.
"""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devmeter.embedded import EmbeddedBroker, start_broker
from devmeter.embedded.broker import AUTOSAVE_INTERVAL_S
from ingest.mqtt import parse_mqtt_url
from ingest.processor import device_topic
from tests.conftest import Cli, seed_fleet
from tests.integration.test_ingest_resilience import WorkerProcess
from tests.integration.test_ingest_worker import poll

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")),
    reason="mosquitto is not installed",
)

DEVICES = 50
BASE = datetime.now(UTC) - timedelta(hours=2)
#: Unacknowledged messages the publisher allows itself: far inside the broker's queue limit.
WINDOW = 200


class Broker:
    """The test's own Mosquitto, restartable on the same port with the same persistence."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.handle: EmbeddedBroker = start_broker(data_dir, prefer="mosquitto")
        self.port = self.handle.port

    @property
    def url(self) -> str:
        return self.handle.url

    def restart(self) -> None:
        """Graceful: SIGTERM (mosquitto saves its database), then start again."""
        self.handle.stop()
        self.handle = start_broker(self.data_dir, prefer="mosquitto", port=self.port)

    def kill_and_restart(self) -> None:
        """SIGKILL: whatever mosquitto had not saved is gone; then start again."""
        assert self.handle.pid is not None
        os.kill(self.handle.pid, signal.SIGKILL)
        poll(lambda: not self.handle.alive(), 10, "mosquitto to die")
        self.handle.stop()
        self.handle = start_broker(self.data_dir, prefer="mosquitto", port=self.port)

    def stop(self) -> None:
        self.handle.stop()


class Stream(threading.Thread):
    """Publishes heartbeats ``first..first+total-1`` (device i % DEVICES, seq i // DEVICES)
    at QoS 1, at most WINDOW unacknowledged, riding out broker restarts (paho reconnects and
    resends); ``acked`` holds (device, seq) of every PUBACK received."""

    def __init__(self, url: str, uid: str, total: int, first: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.uid, self.total, self.first = url, uid, total, first
        self.acked: set[tuple[str, int]] = set()
        self.error: BaseException | None = None
        self._lock = threading.Condition()
        self._pending: dict[int, tuple[str, int]] = {}
        self._early: set[int] = set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            key = self._pending.pop(mid, None)
            if key is None:
                self._early.add(mid)  # acknowledged before run() recorded what it was
            else:
                self.acked.add(key)
            self._lock.notify_all()

    def run(self) -> None:
        address = parse_mqtt_url(self.url)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fault-pub-{uuid.uuid4().hex[:8]}",
            protocol=address.protocol,
        )
        client.on_publish = self._on_publish
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.connect(address.host, address.port)
        client.loop_start()
        try:
            for i in range(self.first, self.first + self.total):
                device, seq = device_id(self.uid, i % DEVICES), i // DEVICES
                payload = orjson.dumps(
                    {
                        "state": "active",
                        "ts": (BASE + timedelta(milliseconds=i)).isoformat(),
                        "seq": seq,
                    }
                )
                with self._lock:
                    if not self._lock.wait_for(lambda: len(self._pending) < WINDOW, 60):
                        raise TimeoutError("no PUBACK for 60 s")
                # Outside our lock: paho calls on_publish holding its own lock.
                info = client.publish(device_topic("acme", device), payload, qos=1)
                with self._lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self.acked.add((device, seq))
                    else:
                        self._pending[info.mid] = (device, seq)
            with self._lock:
                if not self._lock.wait_for(lambda: not self._pending, 60):
                    raise TimeoutError(f"{len(self._pending)} never acknowledged")
        except BaseException as exc:
            self.error = exc
        finally:
            client.disconnect()
            client.loop_stop()

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def finish(self) -> None:
        self.join(120)
        assert not self.is_alive(), "the publisher did not finish"
        assert self.error is None, self.error


def device_id(uid: str, n: int) -> str:
    return f"f{uid}-{n}"


def stored(url: str) -> set[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return {(d, s) for d, s in conn.execute("SELECT device_id, seq FROM heartbeats")}


def doubled(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) - count(DISTINCT (device_id, seq, reporter)) FROM heartbeats"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_all_stored(url: str, acked: set[tuple[str, int]], timeout: float = 60) -> None:
    poll(lambda: acked <= stored(url), timeout, f"all {len(acked)} acknowledged heartbeats")


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def fleet(database_url: str, uid: str) -> None:
    seed_fleet(
        database_url,
        [(device_id(uid, n), "lte-m", None) for n in range(DEVICES)],
        BASE - timedelta(days=1),
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def worker_env(cli_env: dict[str, str], database_url: str, broker: Broker) -> dict[str, str]:
    # No client id, no share group: the defaults are what is under test.
    return {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_MQTT_URL": broker.url,
        "DEVMETER_INGEST_SESSION_EXPIRY_S": "300",
        "DEVMETER_INGEST_MAX_INFLIGHT": "1000",
        "DEVMETER_INGEST_BATCH_SIZE": "500",
        "DEVMETER_INGEST_BATCH_AGE_MS": "50",
        "DEVMETER_INGEST_LOG_INTERVAL_S": "1",
    }


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(worker_env, tmp_path)
    w.start()
    yield w
    w.stop()


def report(name: str, acked: int, lost: int, twice: int) -> None:
    # Shown with -s (and in the lead's report): the measured numbers, not only a pass.
    print(f"\n[fault] {name}: acknowledged {acked}, lost {lost}, doubled {twice}")  # noqa: T201


@pytest.mark.usefixtures("fleet")
def test_graceful_broker_restart_mid_stream(
    database_url: str, broker: Broker, worker: WorkerProcess, uid: str
) -> None:
    stream = Stream(broker.url, uid, 6_000)
    stream.start()
    poll(lambda: stream.count() >= 2_000, 30, "2,000 acknowledged before the restart")
    broker.restart()
    stream.finish()
    acked = stream.acked
    assert len(acked) == 6_000
    wait_all_stored(database_url, acked)
    lost, twice = len(acked - stored(database_url)), doubled(database_url)
    report("graceful broker restart", len(acked), lost, twice)
    assert (lost, twice) == (0, 0)
    assert "session present: True" in worker.log.read_text()


@pytest.mark.usefixtures("fleet")
def test_worker_sigkill_mid_stream(
    database_url: str, broker: Broker, worker: WorkerProcess, uid: str
) -> None:
    stream = Stream(broker.url, uid, 6_000)
    stream.start()
    poll(lambda: len(stored(database_url)) >= 2_000, 30, "2,000 stored before the kill")
    worker.kill()
    worker.start()
    stream.finish()
    wait_all_stored(database_url, stream.acked)
    lost, twice = len(stream.acked - stored(database_url)), doubled(database_url)
    report("worker SIGKILL", len(stream.acked), lost, twice)
    assert (lost, twice) == (0, 0)


@pytest.mark.usefixtures("fleet")
def test_worker_redeployed_under_another_host_name(
    database_url: str, broker: Broker, worker_env: dict[str, str], uid: str, tmp_path: Path
) -> None:
    # The process believes it runs on another host: socket.gethostname() and $HOSTNAME both
    # change, as in a container recreated by a deployment.
    site = tmp_path / "fakehost"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os, socket
            if os.environ.get("FAKE_HOSTNAME"):
                socket.gethostname = lambda: os.environ["FAKE_HOSTNAME"]
            """
        )
    )

    def on_host(name: str) -> WorkerProcess:
        env = {
            **worker_env,
            "FAKE_HOSTNAME": name,
            "HOSTNAME": name,
            "PYTHONPATH": f"{site}{os.pathsep}{worker_env['PYTHONPATH']}",
        }
        w = WorkerProcess(env, tmp_path)
        w.start()
        return w

    old = on_host("ingest-7f9c-a")
    stream = Stream(broker.url, uid, 6_000)
    stream.start()
    poll(lambda: len(stored(database_url)) >= 2_000, 30, "2,000 stored before the redeploy")
    old_log = old.stop()  # the old container is stopped; the stream goes on
    new = on_host("ingest-31d2-b")
    try:
        stream.finish()
        wait_all_stored(database_url, stream.acked)
        lost, twice = len(stream.acked - stored(database_url)), doubled(database_url)
        report("worker under another host name", len(stream.acked), lost, twice)
        assert (lost, twice) == (0, 0)
        new_log = new.log.read_text()
    finally:
        new.stop()
    # Same client id on both hosts, and the new one took over the old one's session: no
    # session is left behind holding (and, with a shared subscription, taking) messages.
    assert "as 'devmeter-ingest'" in old_log
    assert "as 'devmeter-ingest' (session present: True)" in new_log


@pytest.mark.usefixtures("fleet")
def test_broker_sigkill_loses_only_what_came_after_the_last_save(
    database_url: str,
    broker: Broker,
    worker: WorkerProcess,
    uid: str,
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # The worst case: the worker is away, so everything is queued in the broker, where only
    # what was saved survives a SIGKILL. 1,000 heartbeats are queued and saved (the database
    # file is rewritten after the last PUBACK, within AUTOSAVE_INTERVAL_S), then 50 more are
    # queued and the broker is killed at once: those 50 may be lost, nothing else may.
    worker.stop()
    saved = Stream(broker.url, uid, 1_000)
    saved.start()
    saved.finish()
    acked_at = time.time()
    database = broker.data_dir / "mosquitto" / "mosquitto.db"
    poll(
        lambda: database.exists() and database.stat().st_mtime > acked_at,
        AUTOSAVE_INTERVAL_S + 10,
        "the broker to save its database",
    )
    unsaved = Stream(broker.url, uid, 50, first=1_000)
    unsaved.start()
    unsaved.finish()
    broker.kill_and_restart()
    worker.start()
    # One more heartbeat per device after the restart: stored last, it shows that what the
    # broker still had was delivered, and it turns any loss into a gap in each device's seq.
    after = Stream(broker.url, uid, DEVICES, first=1_050)
    after.start()
    after.finish()
    wait_all_stored(database_url, after.acked)
    have = stored(database_url)
    lost = len((saved.acked | unsaved.acked) - have)
    twice = doubled(database_url)
    report(
        f"broker SIGKILL (autosave_interval {AUTOSAVE_INTERVAL_S} s; 50 queued after the "
        "last save)",
        len(saved.acked) + len(unsaved.acked),
        lost,
        twice,
    )
    assert saved.acked <= have, "a heartbeat the broker had saved was lost"
    assert lost <= len(unsaved.acked)
    assert twice == 0
    # The worker found its session (saved with the rest), so it was queued for meanwhile.
    assert worker.log.read_text().count("session present: True") >= 1

    # The reconciliation sees exactly that loss, device by device.
    cli = Cli({**cli_env, "DEVMETER_DATABASE_URL": database_url}, tmp_path)
    result = cli("ingest", "gaps", "--account", "acme", "--since", BASE.date().isoformat())
    assert result.code == 0, result.stderr
    gaps = result.json()
    assert isinstance(gaps, dict)
    assert gaps["missing"] == lost
