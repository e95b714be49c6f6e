"""The ingest worker end to end: a real MQTT broker, a real PostgreSQL, real messages."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.mqtt import parse_mqtt_url
from ingest.processor import MAX_CHILDREN, Reason, device_topic, gateway_topic
from ingest.worker import IngestOptions, IngestWorker
from tests.conftest import seed_fleet

REGISTERED = datetime.now(UTC) - timedelta(hours=1)


def poll(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Publisher:
    def __init__(self, url: str) -> None:
        address = parse_mqtt_url(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=address.protocol,
        )
        if address.username is not None:
            self.client.username_pw_set(address.username, address.password)
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | dict[str, object]) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, body, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def devices(database_url: str, uid: str) -> dict[str, str]:
    ids = {"d": f"d-{uid}", "g": f"g-{uid}", "c": f"c-{uid}", "x": f"x-{uid}"}
    seed_fleet(
        database_url,
        [
            (ids["d"], "lte-m", None),
            (ids["g"], "gateway", None),
            (ids["c"], "wifi", ids["g"]),
            (ids["x"], "wifi", None),
        ],
        REGISTERED,
    )
    return ids


@pytest.fixture
def worker(database_url: str, mqtt_url: str, uid: str) -> Iterator[IngestWorker]:
    options = IngestOptions(
        client_id=f"test-ingest-{uid}",
        share_group=f"g{uid}",
        batch_age_s=0.05,
        session_expiry_s=60,
        max_inflight=1000,
    )
    w = IngestWorker(database_url, mqtt_url, options)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    poll(w.subscriber.subscribed.is_set, 15, "the worker to subscribe")
    yield w
    stop.set()
    thread.join(15)
    assert not thread.is_alive()


@pytest.fixture
def publisher(mqtt_url: str) -> Iterator[Publisher]:
    p = Publisher(mqtt_url)
    yield p
    p.close()


def count(url: str, sql: str, *args: object) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, args).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def now_ts(offset_s: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).isoformat()


@pytest.mark.usefixtures("worker")
def test_device_and_gateway_heartbeats_land(
    database_url: str, devices: dict[str, str], publisher: Publisher
) -> None:
    publisher.publish(
        device_topic("acme", devices["d"]), {"state": "inactive", "ts": now_ts(), "seq": 1}
    )
    publisher.publish(
        gateway_topic("acme", devices["g"]),
        {
            "state": "active",
            "ts": now_ts(),
            "seq": 9,
            "devices": [{"id": devices["c"], "state": "inactive"}],
        },
    )
    ids = [devices["d"], devices["g"], devices["c"]]
    poll(
        lambda: (
            count(database_url, "SELECT count(*) FROM heartbeats WHERE device_id = ANY(%s)", ids)
            == 3
        ),
        what="3 heartbeats",
    )
    with psycopg.connect(database_url) as conn:
        states = dict(
            conn.execute("SELECT id, state FROM devices WHERE id = ANY(%s)", (ids,)).fetchall()
        )
        sources = conn.execute(
            "SELECT device_id, source FROM device_state_events WHERE source <> 'registration' "
            "ORDER BY device_id"
        ).fetchall()
    assert states == {devices["d"]: "inactive", devices["g"]: "active", devices["c"]: "inactive"}
    assert sorted(sources) == sorted([(devices["c"], "gateway"), (devices["d"], "heartbeat")])


def test_every_rejection_reason_is_quarantined(
    database_url: str,
    devices: dict[str, str],
    worker: IngestWorker,
    publisher: Publisher,
    uid: str,
) -> None:
    d, g = devices["d"], devices["g"]
    ok = {"state": "active", "ts": now_ts(), "seq": 1}
    cases: list[tuple[Reason, str, bytes | dict[str, object]]] = [
        (Reason.BAD_TOPIC, f"devmeter/v2/acme/{d}/status", ok),
        (Reason.PAYLOAD_TOO_LARGE, device_topic("acme", d), b"{" + b" " * 70_000 + b"}"),
        (Reason.MALFORMED_JSON, device_topic("acme", d), b"{nope"),
        (Reason.SCHEMA, device_topic("acme", d), {"state": "active", "ts": now_ts()}),
        (
            Reason.TOO_MANY_CHILDREN,
            gateway_topic("acme", g),
            {
                **ok,
                "devices": [{"id": f"z{i}", "state": "active"} for i in range(MAX_CHILDREN + 1)],
            },
        ),
        (Reason.UNKNOWN_DEVICE, device_topic("acme", f"ghost-{uid}"), ok),
        (
            Reason.NOT_BOUND,
            gateway_topic("acme", g),
            {**ok, "devices": [{"id": devices["x"], "state": "active"}]},
        ),
        (Reason.NOT_A_GATEWAY, gateway_topic("acme", d), ok),
        (Reason.TS_IN_FUTURE, device_topic("acme", d), {**ok, "ts": now_ts(3600)}),
        (
            Reason.BEFORE_REGISTRATION,
            device_topic("acme", d),
            {**ok, "ts": (REGISTERED - timedelta(days=1)).isoformat()},
        ),
    ]
    for _, topic, payload in cases:
        publisher.publish(topic, payload)
    topics = sorted({topic for _, topic, _ in cases})

    poll(
        lambda: (
            count(
                database_url,
                "SELECT count(*) FROM rejected_heartbeats WHERE topic = ANY(%s)",
                topics,
            )
            >= len(cases)
        ),
        what="every rejection",
    )
    with psycopg.connect(database_url) as conn:
        reasons = sorted(
            str(r[0])
            for r in conn.execute(
                "SELECT reason FROM rejected_heartbeats WHERE topic = ANY(%s)", (topics,)
            )
        )
    assert reasons == sorted(reason.value for reason, _, _ in cases)
    assert count(database_url, "SELECT count(*) FROM heartbeats WHERE device_id = %s", d) == 0
    assert sum(worker.metrics.total_rejections.values()) >= len(cases)


def test_redelivered_message_is_stored_once(
    database_url: str, devices: dict[str, str], worker: IngestWorker, publisher: Publisher
) -> None:
    message = {"state": "active", "ts": now_ts(), "seq": 42}
    publisher.publish(device_topic("acme", devices["d"]), message)
    publisher.publish(device_topic("acme", devices["d"]), message)
    publisher.publish(device_topic("acme", devices["d"]), {**message, "seq": 43})
    poll(lambda: worker.metrics.total_messages >= 3, what="3 messages")
    poll(
        lambda: (
            count(
                database_url, "SELECT count(*) FROM heartbeats WHERE device_id = %s", devices["d"]
            )
            == 2
        ),
        what="2 distinct heartbeats",
    )
    assert (
        count(
            database_url,
            "SELECT count(*) FROM heartbeats WHERE device_id = %s AND seq = 42",
            devices["d"],
        )
        == 1
    )
