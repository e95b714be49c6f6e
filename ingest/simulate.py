"""A fleet simulator: registers (or reuses) devices and publishes realistic heartbeats.

It is the load generator of the ingest benchmark and of the demo, so it has two jobs that
pull apart: look like a real fleet (state flips, gateways reporting for their devices, a
share of bad messages, both ``ts`` forms) and publish fast enough to saturate a worker.
Payloads are therefore formatted by hand rather than through a JSON encoder, and the
publisher keeps a bounded window of unacknowledged QoS 1 messages instead of paho's
unbounded queue, so that "published" means "the broker has it" when it returns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devmeter.errors import NotFoundError
from ingest.mqtt import parse_mqtt_url
from ingest.processor import MAX_CHILDREN, device_topic, gateway_topic
from metering.catalog import Catalog
from metering.registry import (
    GATEWAY_CLASS,
    create_account,
    get_account,
    register_device,
)

log = logging.getLogger("devmeter.simulate")

Conn = psycopg.Connection[dict[str, object]]


class BadKind(StrEnum):
    """The kinds of bad message the simulator sends; each maps to one quarantine reason."""

    malformed_json = "malformed_json"
    schema = "schema"
    unknown_device = "unknown_device"
    ts_in_future = "ts_in_future"
    bad_topic = "bad_topic"
    not_bound = "not_bound"


@dataclass(frozen=True, slots=True)
class SimDevice:
    id: str
    gateway_id: str | None


@dataclass(frozen=True, slots=True)
class Fleet:
    devices: tuple[SimDevice, ...]
    gateways: tuple[str, ...]
    #: Device ids are unique per account (D1a): topics name the account too.
    account_ref: str

    def direct(self) -> list[str]:
        return [d.id for d in self.devices if d.gateway_id is None]

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {g: [] for g in self.gateways}
        for d in self.devices:
            if d.gateway_id is not None:
                out[d.gateway_id].append(d.id)
        return out


def fleet_ids(
    prefix: str, devices: int, gateways: int, gateway_share: float
) -> tuple[list[str], list[SimDevice]]:
    """Deterministic ids, so that a second run with the same arguments reuses the fleet."""
    gateway_ids = [f"{prefix}-g{j:04d}" for j in range(gateways)]
    bound = round(devices * gateway_share) if gateway_ids else 0
    sims = [
        SimDevice(
            f"{prefix}-d{i:06d}",
            gateway_ids[i % len(gateway_ids)] if i < bound else None,
        )
        for i in range(devices)
    ]
    return gateway_ids, sims


def ensure_account(conn: Conn, catalog: Catalog, account_ref: str, at: datetime) -> str | None:
    """Create the account (plan ``standard``, JP, Asia/Tokyo) if it does not exist, so that
    ``devmeter simulate`` works on an empty database for a demo; returns the new owner's API
    key (to sign in to the console), or None when the account already existed."""
    try:
        get_account(conn, account_ref)
        return None
    except NotFoundError:
        created = create_account(
            conn,
            catalog,
            ref=account_ref,
            name=f"Simulated fleet {account_ref}",
            plan="standard",
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=at.date() - timedelta(days=60),
        )
        return created.api_key


def ensure_fleet(
    conn: Conn,
    catalog: Catalog,
    *,
    account_ref: str,
    device_class: str,
    prefix: str,
    devices: int,
    gateways: int = 0,
    gateway_share: float = 0.5,
    at: datetime,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Fleet, int]:
    """Register the fleet's devices that do not exist yet; returns the fleet and how many were new.

    Creates the account when it does not exist (see `ensure_account`).
    """
    ensure_account(conn, catalog, account_ref, at)
    gateway_ids, sims = fleet_ids(prefix, devices, gateways, gateway_share)
    existing = {
        str(row["id"])
        for row in conn.execute(
            "SELECT id FROM devices WHERE id = ANY(%s)",
            ([*gateway_ids, *(d.id for d in sims)],),
        )
    }
    todo: list[tuple[str, str, str | None]] = [
        (g, GATEWAY_CLASS, None) for g in gateway_ids if g not in existing
    ]
    todo += [(d.id, device_class, d.gateway_id) for d in sims if d.id not in existing]
    for done, (device_id, cls, gateway_id) in enumerate(todo, 1):
        register_device(
            conn,
            catalog,
            account_ref=account_ref,
            device_class=cls,
            at=at,
            device_id=device_id,
            gateway_id=gateway_id,
            source="cli",
        )
        if progress is not None and (done % 500 == 0 or done == len(todo)):
            progress(done, len(todo))
    return Fleet(tuple(sims), tuple(gateway_ids), account_ref), len(todo)


@dataclass(slots=True)
class Tally:
    messages: int = 0
    heartbeats: int = 0
    flips: int = 0
    bad: dict[str, int] = field(default_factory=dict)


class Traffic:
    """An endless, reproducible stream of (topic, payload) in round-robin over the fleet.

    Each direct device and each gateway speaks in turn; a gateway's message carries its
    own state and the states of up to ``MAX_CHILDREN`` bound devices, so a gateway with
    more children than that reports them over several consecutive messages.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        flip_share: float = 0.02,
        bad_share: float = 0.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        children_per_message: int = 50,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if not fleet.devices and not fleet.gateways:
            raise ValueError("the fleet has no devices")
        self._rng = random.Random(seed)  # noqa: S311 -- traffic shape, not secrets
        self._clock = clock
        self.flip_share = flip_share
        self.bad_share = bad_share
        self.tally = Tally()
        self._state: dict[str, str] = {}
        self._seq: dict[str, int] = {}
        self._speakers: list[tuple[str, list[str]]] = [(d, []) for d in fleet.direct()]
        size = max(1, min(children_per_message, MAX_CHILDREN))
        for gateway, kids in fleet.children().items():
            chunks = [kids[i : i + size] for i in range(0, len(kids), size)] or [[]]
            self._speakers += [(gateway, chunk) for chunk in chunks]
        # Disjoint slices of speakers for parallel publishers; a gateway's chunk stays whole.
        index, total = shard
        self._speakers = self._speakers[index::total]
        if not self._speakers:
            raise ValueError(f"shard {index}/{total} of the fleet is empty")
        self._gateways = set(fleet.gateways)
        self._direct_one = next((d for d, _ in self._speakers if d not in self._gateways), None)
        self._a_gateway = fleet.gateways[0] if fleet.gateways else None
        self._account = fleet.account_ref
        self._next = 0

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return self

    def __next__(self) -> tuple[str, bytes]:
        self.tally.messages += 1
        if self.bad_share and self._rng.random() < self.bad_share:
            return self._bad()
        speaker, children = self._speakers[self._next]
        self._next = (self._next + 1) % len(self._speakers)
        now = self._clock()
        ts = self._ts(now)
        own = self._step(speaker)
        if speaker not in self._gateways:
            self.tally.heartbeats += 1
            return device_topic(self._account, speaker), (
                f'{{"state":"{own}","ts":{ts},"seq":{self._seq[speaker]}}}'.encode()
            )
        kids = ",".join(f'{{"id":"{c}","state":"{self._step(c)}"}}' for c in children)
        self.tally.heartbeats += 1 + len(children)
        return gateway_topic(self._account, speaker), (
            f'{{"state":"{own}","ts":{ts},"seq":{self._seq[speaker]},"devices":[{kids}]}}'
        ).encode()

    def _step(self, device_id: str) -> str:
        state = self._state.get(device_id, "active")
        if self.flip_share and self._rng.random() < self.flip_share:
            state = "inactive" if state == "active" else "active"
            self.tally.flips += 1
        self._state[device_id] = state
        self._seq[device_id] = self._seq.get(device_id, 0) + 1
        return state

    def _ts(self, now: float) -> str:
        # Both forms the protocol allows; epoch milliseconds is what small devices send.
        if self._rng.random() < 0.5:
            return str(int(now * 1000))
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
        return f'"{stamp.replace("+00:00", "Z")}"'

    def _bad(self) -> tuple[str, bytes]:
        kinds = list(BadKind)
        if self._a_gateway is None or self._direct_one is None:
            kinds.remove(BadKind.not_bound)
        kind = self._rng.choice(kinds)
        self.tally.bad[kind] = self.tally.bad.get(kind, 0) + 1
        now = self._clock()
        ts = self._ts(now)
        some = self._direct_one or self._speakers[0][0]
        match kind:
            case BadKind.malformed_json:
                return device_topic(self._account, some), b'{"state":"active","ts":'
            case BadKind.schema:
                return device_topic(
                    self._account, some
                ), f'{{"state":"on","ts":{ts},"seq":1}}'.encode()
            case BadKind.unknown_device:
                # Derived from a fleet id so that a test can tell its own ghosts apart.
                ghost = f"{some}-ghost{self._rng.randrange(10**6)}"
                return device_topic(
                    self._account, ghost
                ), f'{{"state":"active","ts":{ts},"seq":1}}'.encode()
            case BadKind.ts_in_future:
                future = int((now + 3600) * 1000)
                return device_topic(
                    self._account, some
                ), f'{{"state":"active","ts":{future},"seq":1}}'.encode()
            case BadKind.bad_topic:
                return f"devmeter/v2/{self._account}/{some}/telemetry", b'{"state":"active"}'
            case BadKind.not_bound:
                child = f'{{"id":"{some}","state":"active"}}'
                body = f'{{"state":"active","ts":{ts},"seq":1,"devices":[{child}]}}'
                return gateway_topic(self._account, str(self._a_gateway)), body.encode()


@dataclass(slots=True)
class PublishResult:
    published: int
    acked: int
    seconds: float


class Publisher:
    """QoS 1 publisher with a bounded window of unacknowledged messages.

    paho's ``publish`` never blocks: past ``max_inflight`` it queues without limit, and a
    process that exits then silently drops the queue (``mosquitto_pub -l`` has the same
    flaw). Waiting for the window keeps memory flat and makes the counts honest.
    """

    def __init__(self, url: str, *, client_id: str, window: int = 1000) -> None:
        address = parse_mqtt_url(url)
        self.window = window
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=address.protocol
        )
        if address.username:
            self._client.username_pw_set(address.username, address.password)
        # Our own window bounds what is unacknowledged; paho's in-flight limit would only add
        # a walk over its in-flight list on every acknowledgement.
        self._client.max_inflight_messages_set(0)
        self._client.max_queued_messages_set(0)
        self._acked = 0
        self._published = 0
        self._cond = threading.Condition()
        self._client.on_publish = self._on_publish
        self._client.connect(address.host, address.port, keepalive=30)
        self._client.loop_start()

    def _on_publish(self, *_: object) -> None:
        with self._cond:
            self._acked += 1
            if self._published - self._acked < self.window:
                self._cond.notify()

    @property
    def acked(self) -> int:
        return self._acked

    def publish(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._published - self._acked < self.window, 30):
                raise TimeoutError("the broker has not acknowledged a publish for 30 s")
            self._published += 1
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")

    def drain(self, timeout: float = 60) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._acked >= self._published, timeout):
                missing = self._published - self._acked
                raise TimeoutError(f"{missing} messages not acknowledged after {timeout:.0f} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run_traffic(
    publisher: Publisher,
    messages: Iterator[tuple[str, bytes]],
    *,
    rate: float,
    count: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_every: float = 1.0,
) -> PublishResult:
    """Publish at ``rate`` messages/s (0 = as fast as the broker acknowledges) until ``count``
    messages, ``duration`` seconds or ``stop``; waits for the last acknowledgement."""
    start = time.monotonic()
    next_report = start + progress_every
    sent = 0
    # Pace by schedule, not by sleeping a fixed gap: the gap would accumulate every delay.
    interval = 1.0 / rate if rate > 0 else 0.0
    # Check the limits before drawing the next message, so the traffic tally counts only
    # what was sent.
    while count is None or sent < count:
        now = time.monotonic()
        if (duration is not None and now - start >= duration) or (stop and stop.is_set()):
            break
        topic, payload = next(messages)
        if interval:
            due = start + sent * interval
            if due > now:
                time.sleep(due - now)
        publisher.publish(topic, payload)
        sent += 1
        if progress is not None and now >= next_report:
            progress(sent, now - start)
            next_report = now + progress_every
    publisher.drain()
    return PublishResult(sent, publisher.acked, time.monotonic() - start)
