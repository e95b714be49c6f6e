"""Device credentials and topic rights at a real Mosquitto, configured as `devmeter up` does.

Every refusal is made by a real client (paho MQTT 5, and `mosquitto_pub` for MQTT 3.1.1).
Messages that must not arrive are checked with a fence: the same client publishes a permitted
message after the forbidden one, and once the reader has the fence (Mosquitto keeps one
connection's messages in order) the forbidden one would have arrived before it.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devmeter.db import connect
from devmeter.embedded import EmbeddedBroker, mosquitto_user, start_broker
from ingest.broker_auth import INGEST_USERNAME, CredentialSync, guard_plugin
from ingest.protocol import device_topic, gateway_topic, mqtt_username
from metering.catalog import load_catalog
from metering.registry import create_account, register_device, rotate_device_key

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is None,
    reason="mosquitto is not installed (apt-get install mosquitto)",
)

INGEST_PASSWORD = "ingest-" + uuid.uuid4().hex


@dataclass
class Fleet:
    keys: dict[str, str]  # username -> device key


@dataclass
class AuthBroker:
    broker: EmbeddedBroker
    sync: CredentialSync
    database_url: str
    host: str
    port: int


def _register(url: str, account: str, device_id: str, device_class: str, **kw: str) -> str:
    with connect(url) as conn, conn.transaction():
        return register_device(
            conn,
            load_catalog(),
            account_ref=account,
            device_class=device_class,
            device_id=device_id,
            at=datetime.now(UTC),
            **kw,  # type: ignore[arg-type]
        ).key


@pytest.fixture
def fleet(database_url: str) -> Fleet:
    catalog = load_catalog()
    with connect(database_url) as conn, conn.transaction():
        for ref in ("acme", "beta"):
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
    keys = {
        "acme/pump-1": _register(database_url, "acme", "pump-1", "lte-m"),
        "beta/pump-1": _register(database_url, "beta", "pump-1", "lte-m"),
        "acme/g1": _register(database_url, "acme", "g1", "gateway"),
    }
    keys["acme/c1"] = _register(database_url, "acme", "c1", "wifi", gateway_id="g1")
    return Fleet(keys)


@contextmanager
def authenticating_broker(database_url: str, tmp_path: Path) -> Iterator[AuthBroker]:
    """A Mosquitto with devmeter's authentication, kept current by `CredentialSync`, as
    `devmeter up` runs it; devmeter's ingest logs in with INGEST_PASSWORD."""
    holder: list[EmbeddedBroker] = []
    sync = CredentialSync(
        database_url,
        tmp_path / "auth",
        reload=lambda: holder[0].reload(),
        ingest_password=INGEST_PASSWORD,
        owner=mosquitto_user(),
        resync_s=30,
    )
    sync.write()
    broker = start_broker(tmp_path / "broker", prefer="mosquitto", auth_dir=sync.directory)
    holder.append(broker)
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    thread.start()
    host, port = broker.url.removeprefix("mqtt://").split(":")
    try:
        yield AuthBroker(broker, sync, database_url, host, int(port))
    finally:
        stop.set()
        thread.join(10)
        broker.stop()


@pytest.fixture
def auth_broker(database_url: str, fleet: Fleet, tmp_path: Path) -> Iterator[AuthBroker]:
    assert fleet.keys, "devices first: the broker starts with their credentials"
    with authenticating_broker(database_url, tmp_path) as broker:
        yield broker


class Client:
    """A connected paho client that records what it receives, PUBACK codes and disconnects."""

    def __init__(self, b: AuthBroker, username: str | None, password: str | None) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.suback: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.disconnected = threading.Event()
        self.puback: dict[int, ReasonCode] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username or f"anon-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        self.client.on_message = lambda _c, _u, m: self.received.put((m.topic, m.payload))
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.suback.put(list(rcs))
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=10)

    def _on_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: Properties) -> None:
        self.puback[mid] = rc

    @property
    def ok(self) -> bool:
        return not self.rc.is_failure

    def publish(self, topic: str, body: dict[str, object]) -> ReasonCode:
        info = self.client.publish(topic, json.dumps(body), qos=1)
        info.wait_for_publish(timeout=10)
        return self.puback[info.mid]

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.client.subscribe(topic, qos=1)
        return self.suback.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(b: AuthBroker, username: str | None, password: str | None) -> Client:
        c = Client(b, username, password)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _beat(seq: int) -> dict[str, object]:
    return {"state": "active", "ts": datetime.now(UTC).isoformat(), "seq": seq}


def _fenced(reader: Client, fence_topic: str) -> list[str]:
    """Topics ``reader`` got up to and including the fence (bounded wait)."""
    got: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        topic, _ = reader.received.get(timeout=max(0.01, deadline - time.monotonic()))
        got.append(topic)
        if topic == fence_topic:
            return got
    pytest.fail(f"the fence on {fence_topic} never arrived; got {got}")


def test_only_current_device_keys_connect(
    auth_broker: AuthBroker, fleet: Fleet, clients: Callable[..., Client]
) -> None:
    key = fleet.keys["acme/pump-1"]
    assert clients(auth_broker, "acme/pump-1", key).ok
    # Tenant-scoped: beta has its own pump-1 with its own key; neither key opens the other.
    assert clients(auth_broker, "beta/pump-1", fleet.keys["beta/pump-1"]).ok
    refused = [
        clients(auth_broker, "acme/pump-1", key + "x"),  # wrong key
        clients(auth_broker, "beta/pump-1", key),  # another tenant's device
        clients(auth_broker, "acme/ghost", key),  # unknown device
        clients(auth_broker, None, None),  # anonymous
        clients(auth_broker, INGEST_USERNAME, key),  # devmeter's own identity
    ]
    assert [c.rc.is_failure for c in refused] == [True] * 5
    assert {c.rc.value for c in refused} <= {0x86, 0x87}  # bad credentials / not authorized


def test_mosquitto_pub_311_needs_the_key(auth_broker: AuthBroker, fleet: Fleet) -> None:
    topic = device_topic("acme", "pump-1")

    def pub(password: str) -> int:
        return subprocess.run(
            [
                "mosquitto_pub", "-h", auth_broker.host, "-p", str(auth_broker.port),
                "-V", "mqttv311", "-q", "1", "-i", "acme/pump-1", "-u", "acme/pump-1",
                "-P", password, "-t", topic, "-m", json.dumps(_beat(1)),
            ],
            capture_output=True,
            timeout=20,
        ).returncode  # fmt: skip

    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed (package mosquitto-clients)")
    assert pub(fleet.keys["acme/pump-1"]) == 0
    assert pub("dmk_wrong") != 0


def test_devices_publish_only_their_own_topic(
    auth_broker: AuthBroker, fleet: Fleet, clients: Callable[..., Client]
) -> None:
    reader = clients(auth_broker, INGEST_USERNAME, INGEST_PASSWORD)
    assert reader.ok
    assert not reader.subscribe("devmeter/#")[0].is_failure
    pump = clients(auth_broker, "acme/pump-1", fleet.keys["acme/pump-1"])
    gateway = clients(auth_broker, "acme/g1", fleet.keys["acme/g1"])
    own = device_topic("acme", "pump-1")
    forbidden = [
        device_topic("beta", "pump-1"),  # same id, other tenant
        device_topic("acme", "c1"),  # another device of the same account
        gateway_topic("acme", "g1"),  # as a gateway
        gateway_topic("acme", "pump-1"),  # a device's own gateway topic
        "devmeter/v2/acme/pump-1/anything",
    ]
    codes = [pump.publish(topic, _beat(i)) for i, topic in enumerate(forbidden)]
    pump.publish(own, _beat(99))
    assert _fenced(reader, own) == [own]
    # MQTT 5 tells the publisher (PUBACK 0x87), where 3.1.1 cannot.
    assert all(code.value == 0x87 for code in codes), codes

    # A gateway: its gateway topic only (its own state travels in the gateway message).
    gw_own = gateway_topic("acme", "g1")
    body = {**_beat(5), "devices": [{"id": "c1", "state": "active"}]}
    assert gateway.publish(device_topic("acme", "g1"), _beat(4)).value == 0x87
    assert gateway.publish(gateway_topic("acme", "g2"), body).value == 0x87
    assert not gateway.publish(gw_own, body).is_failure
    assert _fenced(reader, gw_own) == [gw_own]


@pytest.mark.parametrize("topic", ["devmeter/#", "$share/devmeter/devmeter/#", "$SYS/#", "#"])
def test_devices_read_nothing_and_steal_nothing(
    auth_broker: AuthBroker, fleet: Fleet, clients: Callable[..., Client], topic: str
) -> None:
    reader = clients(auth_broker, INGEST_USERNAME, INGEST_PASSWORD)
    reader.subscribe("devmeter/#")
    thief = clients(auth_broker, "acme/c1", fleet.keys["acme/c1"])
    granted = thief.subscribe(topic)
    if guard_plugin() is not None:
        # The subscribe guard refuses it at SUBACK (not authorized).
        assert [rc.value for rc in granted] == [0x87]
    pump = clients(auth_broker, "acme/pump-1", fleet.keys["acme/pump-1"])
    own = device_topic("acme", "pump-1")
    for i in range(20):
        pump.publish(own, _beat(i))
    # The reader gets all 20 (none taken by the thief's shared subscription) ...
    got = [reader.received.get(timeout=10)[0] for _ in range(20)]
    assert got == [own] * 20
    # ... and the thief none of them (the reader had them all, so they were delivered).
    assert thief.received.empty()


def test_new_device_connects_within_2s(
    auth_broker: AuthBroker, clients: Callable[..., Client]
) -> None:
    key = _register(auth_broker.database_url, "acme", "fresh-1", "lte-m")
    registered = time.monotonic()
    while True:
        c = clients(auth_broker, mqtt_username("acme", "fresh-1"), key)
        if c.ok:
            break
        assert time.monotonic() - registered < 2.0, "not admitted within 2 s"
        time.sleep(0.05)
    assert time.monotonic() - registered < 2.0


def test_rotated_key_is_refused_within_2s(
    auth_broker: AuthBroker, fleet: Fleet, clients: Callable[..., Client]
) -> None:
    old = fleet.keys["acme/pump-1"]
    connected = clients(auth_broker, "acme/pump-1", old)
    assert connected.ok
    with connect(auth_broker.database_url) as conn, conn.transaction():
        new = rotate_device_key(
            conn, device_id="pump-1", account_id=_acme(conn), at=datetime.now(UTC)
        )
    rotated = time.monotonic()
    # The connection made with the old key is closed ...
    assert connected.disconnected.wait(2.0), "old key's connection still open after 2 s"
    # ... a new one with it is refused, and the new key works.
    assert clients(auth_broker, "acme/pump-1", old).rc.is_failure
    assert time.monotonic() - rotated < 2.5
    assert clients(auth_broker, "acme/pump-1", new.key).ok


def _acme(conn: psycopg.Connection[dict[str, object]]) -> int:
    row = conn.execute("SELECT id FROM accounts WHERE ref = 'acme'").fetchone()
    assert row is not None
    return int(str(row["id"]))


def test_an_incremental_sync_misses_no_transaction_that_commits_late(
    database_url: str, fleet: Fleet, tmp_path: Path
) -> None:
    """A registration still uncommitted while the sync reads is picked up by the next read,
    although a younger one was already seen (the read goes back to the oldest running one)."""
    assert fleet.keys
    sync = CredentialSync(
        database_url, tmp_path / "auth", reload=lambda: None, ingest_password=INGEST_PASSWORD
    )
    sync.write()
    catalog = load_catalog()
    with connect(database_url) as slow:
        register_device(
            slow, catalog, account_ref="acme", device_class="lte-m", device_id="slow",
            at=datetime.now(UTC),
        )  # fmt: skip
        # Committed meanwhile; of another class, as writers of one account and class queue on
        # its usage figures (migration 0014) until the first commits.
        _register(database_url, "acme", "quick", "wifi")
        assert sync.write(full=False)
        text = sync.password_file.read_text()
        assert "acme/quick:" in text
        assert "acme/slow:" not in text
        slow.commit()
    assert sync.write(full=False)
    assert "acme/slow:" in sync.password_file.read_text()
    # Nothing new: nothing written, so the broker would not be reloaded.
    assert not sync.write(full=False)
