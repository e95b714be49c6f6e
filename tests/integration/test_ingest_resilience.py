"""Nothing accepted is lost, nothing is stored twice: worker killed, database cut off."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import pytest

from ingest.processor import device_topic
from tests.conftest import seed_fleet
from tests.integration.test_ingest_worker import Publisher, count, poll

DEVICES = 100
BASE = datetime.now(UTC) - timedelta(hours=2)


class WorkerProcess:
    """`devmeter ingest` as its own process, as it runs in production."""

    def __init__(self, env: dict[str, str], cwd: Path, ready: str = "granted") -> None:
        #: What the worker logs once it receives (MQTT: its subscription was granted).
        self.env, self.cwd, self.ready = env, cwd, ready
        self.log = cwd / f"ingest-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = self.cwd / f"ingest-{uuid.uuid4().hex[:6]}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devmeter", "ingest"],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        poll(
            lambda: self.ready in self.log.read_text() or self.proc.poll() is not None,  # type: ignore[union-attr]
            30,
            "the worker to subscribe",
        )
        assert self.proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                # Reaped here: a Popen collected while its child still runs warns, and the
                # warning fails whichever test the collector happens to run in.
                self.proc.wait(10)
        return self.log.read_text()


class Stream(threading.Thread):
    """Publishes `total` heartbeats over `DEVICES` devices in acknowledged chunks; pausable."""

    def __init__(
        self, url: str, uid: str, total: int, stored: Callable[[], int], chunk: int = 250
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.uid, self.total, self.chunk = url, uid, total, chunk
        self.stored = stored
        self.running = threading.Event()
        self.running.set()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        publisher = Publisher(self.url)
        try:
            for start in range(0, self.total, self.chunk):
                self.running.wait(60)
                # Stay at most ~750 messages ahead of storage: a broker holds only so many for
                # a subscriber that is behind (Mosquitto's default max_queued_messages is 1,000,
                # beside what is in flight to a worker killed mid-batch) and drops the rest,
                # which would test the broker's settings and the worker's speed, not the worker.
                poll(lambda floor=start - 500: self._caught_up(floor), 120, "catching up")
                infos = []
                for i in range(start, min(start + self.chunk, self.total)):
                    payload = orjson.dumps(
                        {
                            "state": "active" if (i // DEVICES) % 3 else "inactive",
                            "ts": (BASE + timedelta(milliseconds=i)).isoformat(),
                            "seq": i,
                        }
                    )
                    infos.append(
                        publisher.client.publish(
                            device_topic("acme", f"s{self.uid}-{i % DEVICES}"), payload, qos=1
                        )
                    )
                for info in infos:
                    info.wait_for_publish(30)
                self.sent = min(start + self.chunk, self.total)
        except BaseException as exc:
            self.error = exc
        finally:
            publisher.close()

    def _caught_up(self, floor: int) -> bool:
        try:
            return self.stored() >= floor
        except psycopg.OperationalError:
            # The outage test closes the database on purpose, possibly while this thread is
            # between its pause check and this count: wait for it as the worker does.
            return False


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
def worker(
    cli_env: dict[str, str], database_url: str, mqtt_url: str, uid: str, tmp_path: Path
) -> Iterator[WorkerProcess]:
    env = {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_MQTT_URL": mqtt_url,
        "DEVMETER_INGEST_CLIENT_ID": f"resilience-{uid}",
        "DEVMETER_INGEST_SHARE_GROUP": f"r{uid}",
        "DEVMETER_INGEST_SESSION_EXPIRY_S": "300",
        # Keeps what the broker holds for the session well inside its queue limits.
        "DEVMETER_INGEST_MAX_INFLIGHT": "1000",
        "DEVMETER_INGEST_BATCH_SIZE": "500",
        "DEVMETER_INGEST_BATCH_AGE_MS": "50",
        "DEVMETER_INGEST_LOG_INTERVAL_S": "1",
    }
    w = WorkerProcess(env, tmp_path)
    w.start()
    yield w
    w.stop()


def stored(url: str) -> int:
    return count(url, "SELECT count(*) FROM heartbeats")


def assert_exactly_once(url: str, total: int) -> None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, time, seq)), min(seq), max(seq) "
            "FROM heartbeats"
        ).fetchone()
    assert row == (total, total, 0, total - 1)


@pytest.mark.usefixtures("fleet")
def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(
    database_url: str, mqtt_url: str, uid: str, worker: WorkerProcess
) -> None:
    total = 20_000
    stream = Stream(mqtt_url, uid, total, lambda: stored(database_url))
    stream.start()
    poll(lambda: stored(database_url) >= 5_000, 120, "5,000 heartbeats before the kill")

    # Pause between acknowledged chunks so that what piles up for the dead worker stays within
    # the broker's offline queue (Mosquitto's default max_queued_messages is 1,000).
    stream.running.clear()
    worker.kill()
    at_kill = stored(database_url)
    assert 0 < at_kill < total
    worker.start()
    stream.running.set()

    stream.join(180)
    assert stream.error is None, stream.error
    assert stream.sent == total
    poll(lambda: stored(database_url) >= total, 120, f"all {total} heartbeats")
    assert_exactly_once(database_url, total)


@pytest.mark.usefixtures("fleet")
def test_database_cut_off_mid_stream_recovers_by_itself(
    database_url: str, owner_database_url: str, mqtt_url: str, uid: str, worker: WorkerProcess
) -> None:
    total = 8_000
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    # Closing a database to connections takes its owner; the worker is the service role.
    admin = psycopg.conninfo.make_conninfo(owner_database_url, dbname="postgres")
    stream = Stream(mqtt_url, uid, total, lambda: stored(database_url))
    stream.start()
    poll(lambda: stored(database_url) >= 1_000, 120, "1,000 heartbeats before the outage")

    # While the worker cannot write it stops acknowledging, and the broker holds what it
    # receives meanwhile only up to its queue limit (Mosquitto's default is 1,000 messages):
    # pause the stream so the test measures the worker, not the broker's configuration.
    stream.running.clear()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'devmeter'",
            (dbname,),
        )
        # The paused stream may all be stored already: one more message (for a device that
        # does not exist, so it ends in quarantine and the counts below are the stream's)
        # makes sure the worker has a batch to write while the database is away.
        nudge = Publisher(mqtt_url)
        try:
            nudge.client.publish(
                device_topic("acme", f"nobody-{uid}"),
                orjson.dumps({"state": "active", "ts": BASE.isoformat(), "seq": 0}),
                qos=1,
            ).wait_for_publish(30)
        finally:
            nudge.close()
        poll(lambda: "not written" in worker.log.read_text(), 30, "the worker to notice")
        # Keep it down for a few failed retries, then bring it back.
        poll(lambda: "retry 3" in worker.log.read_text(), 30, "three failed retries")
        conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    stream.running.set()

    stream.join(180)
    assert stream.error is None, stream.error
    poll(lambda: stored(database_url) >= total, 120, f"all {total} heartbeats")
    assert_exactly_once(database_url, total)
    # The message sent while the database was away was kept too, in quarantine.
    unknown = "SELECT count(*) FROM rejected_heartbeats WHERE reason = 'unknown_device'"
    assert count(database_url, unknown) == 1
    assert worker.proc is not None
    assert worker.proc.poll() is None, "the worker kept running"
