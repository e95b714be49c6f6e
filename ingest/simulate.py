"""A fleet simulator: registers (or reuses) devices and publishes realistic heartbeats.

It is the load generator of the ingest benchmark and of the demo, so it has two jobs that
pull apart: look like a real fleet (state flips, gateways reporting for their devices, a
share of bad messages, both ``ts`` forms) and publish fast enough to saturate a worker.
Payloads are therefore formatted by hand rather than through a JSON encoder, and the
publisher keeps a bounded window of unacknowledged QoS 1 messages instead of paho's
unbounded queue, so that "published" means "the broker has it" when it returns.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import selectors
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal, Protocol

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from devmeter.errors import NotFoundError
from ingest.mqtt import parse_mqtt_url
from ingest.processor import MAX_CHILDREN, device_topic, gateway_topic
from ingest.protocol import mqtt_username
from metering.catalog import Catalog
from metering.registry import (
    GATEWAY_CLASS,
    create_account,
    get_account,
    register_device,
    rotate_device_key,
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
    keys: dict[str, str] | None = None,
) -> tuple[Fleet, int]:
    """Register the fleet's devices that do not exist yet; returns the fleet and how many were new.

    Creates the account when it does not exist (see `ensure_account`). ``keys``, when given,
    receives the key of every device registered now (id -> key): the only moment it is known.
    """
    ensure_account(conn, catalog, account_ref, at)
    account_id = get_account(conn, account_ref).id
    gateway_ids, sims = fleet_ids(prefix, devices, gateways, gateway_share)
    # Ids are unique per account only (D1a): another account's sim-d000001 is not ours.
    existing = {
        str(row["id"])
        for row in conn.execute(
            "SELECT id FROM devices WHERE account_id = %s AND id = ANY(%s)",
            (account_id, [*gateway_ids, *(d.id for d in sims)]),
        )
    }
    todo: list[tuple[str, str, str | None]] = [
        (g, GATEWAY_CLASS, None) for g in gateway_ids if g not in existing
    ]
    todo += [(d.id, device_class, d.gateway_id) for d in sims if d.id not in existing]
    for done, (device_id, cls, gateway_id) in enumerate(todo, 1):
        registered = register_device(
            conn,
            catalog,
            account_ref=account_ref,
            device_class=cls,
            at=at,
            device_id=device_id,
            gateway_id=gateway_id,
            source="cli",
        )
        if keys is not None:
            keys[device_id] = registered.key
        if progress is not None and (done % 500 == 0 or done == len(todo)):
            progress(done, len(todo))
    return Fleet(tuple(sims), tuple(gateway_ids), account_ref), len(todo)


def speaker_keys(
    conn: Conn,
    fleet: Fleet,
    keys: dict[str, str],
    *,
    at: datetime,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Make sure ``keys`` holds a key for every speaker of the fleet; returns how many were rotated.

    Speakers are the direct devices and the gateways: bound devices never connect (their
    heartbeats travel in their gateway's messages), so their keys are left alone. Only a hash
    of a key is stored, so a device registered by an earlier run has a key nobody here knows:
    it gets a new one (``rotate_device_key``). The simulated fleet is the simulator's own, and
    the old key stops working, which is what a rotation means; the caller says so.
    """
    account_id = get_account(conn, fleet.account_ref).id
    todo = [s for s in (*fleet.direct(), *fleet.gateways) if s not in keys]
    for done, device_id in enumerate(todo, 1):
        keys[device_id] = rotate_device_key(
            conn, device_id=device_id, account_id=account_id, at=at
        ).key
        if progress is not None and (done % 500 == 0 or done == len(todo)):
            progress(done, len(todo))
    return len(todo)


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
        as_devices: bool = False,
    ) -> None:
        """``as_devices``: the messages will be published by the devices themselves through an
        authenticating broker (`DevicePublisher`), so an unknown device is reported as a
        gateway's unknown child, which the broker lets through (see `_bad`)."""
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
        self._as_devices = as_devices
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
        # Every message goes out on a topic of the identity that sends it, so that under device
        # authentication the publisher can tell from the topic whose key to connect with.
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
                if self._as_devices and self._a_gateway is not None:
                    # An unknown device has no key, so the broker refuses its connection and
                    # the worker never sees it; a gateway naming an unknown child is let
                    # through (its own topic) and quarantined as unknown_device.
                    child = f'{{"id":"{ghost}","state":"active"}}'
                    body = f'{{"state":"active","ts":{ts},"seq":1,"devices":[{child}]}}'
                    return gateway_topic(self._account, self._a_gateway), body.encode()
                # Without a gateway, under device authentication the ghost tries to connect
                # with a made-up key and is refused by the broker: the point of authentication.
                return device_topic(
                    self._account, ghost
                ), f'{{"state":"active","ts":{ts},"seq":1}}'.encode()
            case BadKind.ts_in_future:
                future = int((now + 3600) * 1000)
                return device_topic(
                    self._account, some
                ), f'{{"state":"active","ts":{future},"seq":1}}'.encode()
            case BadKind.bad_topic:
                # Under device authentication the broker refuses it (ACL: a device writes only
                # its heartbeat topic; PUBACK 0x87 in MQTT 5), so it never reaches quarantine.
                return f"devmeter/v2/{self._account}/{some}/telemetry", b'{"state":"active"}'
            case BadKind.not_bound:
                child = f'{{"id":"{some}","state":"active"}}'
                body = f'{{"state":"active","ts":{ts},"seq":1,"devices":[{child}]}}'
                return gateway_topic(self._account, str(self._a_gateway)), body.encode()


@dataclass(slots=True)
class PublishResult:
    published: int
    #: PUBACKs with a success code: the broker has the message.
    acked: int
    seconds: float
    #: Messages the broker refused, by reason ("Not authorized (0x87)"): PUBACK codes >= 0x80,
    #: and, under device authentication, messages whose connection was refused at CONNACK.
    refused: dict[str, int] = field(default_factory=dict)
    #: Sent but never answered: the connection dropped before the PUBACK.
    unconfirmed: int = 0


def reason_label(reason: ReasonCode, *, at: str = "") -> str:
    """``Not authorized (0x87)``; ``at`` tells a refused connection from a refused publish."""
    return f"{at}{reason.getName()} (0x{reason.value:02x})"


class Sink(Protocol):
    """What `run_traffic` publishes through: `Publisher` or `DevicePublisher`."""

    @property
    def acked(self) -> int: ...
    @property
    def refused(self) -> dict[str, int]: ...
    @property
    def unconfirmed(self) -> int: ...
    def publish(self, topic: str, payload: bytes) -> None: ...
    def drain(self, timeout: float = 60) -> None: ...
    def close(self) -> None: ...


class Publisher:
    """QoS 1 publisher with a bounded window of unacknowledged messages, over one connection.

    paho's ``publish`` never blocks: past ``max_inflight`` it queues without limit, and a
    process that exits then silently drops the queue (``mosquitto_pub -l`` has the same
    flaw). Waiting for the window keeps memory flat and makes the counts honest.

    This is the anonymous mode: one identity publishes every device's topic, which only a
    broker without device authentication accepts (tests, benchmarks).
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
        self._refused: Counter[str] = Counter()
        self._settled = 0
        self._published = 0
        self._cond = threading.Condition()
        self._client.on_publish = self._on_publish
        self._client.connect(address.host, address.port, keepalive=30)
        self._client.loop_start()

    def _on_publish(
        self, _c: object, _u: object, _mid: int, reason: ReasonCode, _p: object
    ) -> None:
        with self._cond:
            # A PUBACK with a failure code (MQTT 5) is an answer too, but not "the broker has
            # it": counted apart, so that "acknowledged" can be compared with what is stored.
            if reason.is_failure:
                self._refused[reason_label(reason)] += 1
            else:
                self._acked += 1
            self._settled += 1
            if self._published - self._settled < self.window:
                self._cond.notify()

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def refused(self) -> dict[str, int]:
        with self._cond:
            return dict(self._refused)

    @property
    def unconfirmed(self) -> int:
        return 0

    def publish(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._published - self._settled < self.window, 30):
                raise TimeoutError("the broker has not acknowledged a publish for 30 s")
            self._published += 1
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")

    def drain(self, timeout: float = 60) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._settled >= self._published, timeout):
                missing = self._published - self._settled
                raise TimeoutError(f"{missing} messages not acknowledged after {timeout:.0f} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass(eq=False, slots=True)
class _Speaker:
    """One identity's connection in `DevicePublisher` (owned by its network thread)."""

    device_id: str
    client: mqtt.Client
    sock: socket.socket | None = None
    events: int = 0
    #: CONNACK received with success: publishes go straight out.
    connected: bool = False
    connect_started: float = 0.0
    #: Messages handed over before the CONNACK: sent when it comes, refused if it refuses.
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    inflight: int = 0


def speaker_of(topic: str) -> str:
    """The device id a simulated message's topic names (``devmeter/v2/<account>/<id>/...``).

    `Traffic` puts every message, a bad one too, on a topic of the identity that sends it.
    """
    parts = topic.split("/", 4)
    if len(parts) < 4 or not parts[3]:
        raise ValueError(f"no device in topic {topic!r}")
    return parts[3]


class DevicePublisher:
    """QoS 1 publisher that speaks as each device, as an authenticating broker requires.

    One MQTT connection per speaker (a direct device or a gateway), username = client id =
    ``<account>/<device>`` and its key as password (issue 9). A speaker is taken from the
    message's topic (`speaker_of`); a speaker with no known key (the simulator's unknown
    devices) connects with a made-up key, and the broker refuses it.

    All clients are driven by ONE network thread with a selector over their sockets (paho's
    external-loop API: ``loop_read``/``loop_write``/``loop_misc``), not one thread each: a
    thread per device costs ~8 MB of address space and a context switch per message, and
    publishing is network-bound anyway. Only that thread touches paho; ``publish`` hands it
    messages through a queue.

    At most ``max_connections`` connections are open at once; past that the least recently
    used idle one is closed (DISCONNECT) to make room, so a fleet bigger than the bound
    behaves like devices that connect, publish and disconnect, at the price of a connection
    per message (the broker checks a PBKDF2 hash for each). The window bounds unacknowledged
    messages over all connections, as in `Publisher`.
    """

    def __init__(
        self,
        url: str,
        account_ref: str,
        keys: Mapping[str, str],
        *,
        window: int = 1000,
        max_connections: int = 4000,
        keepalive: int = 60,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = parse_mqtt_url(url)
        self.window = window
        # One socket per open connection: never more than the file limit allows (less a margin
        # for the process's own files), or connections would fail with EMFILE mid-run.
        self.max_connections = max(
            1, min(max_connections, _raise_fd_limit(max_connections + 64) - 64)
        )
        self._account = account_ref
        self._keys = dict(keys)
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._published = 0
        self._settled = 0
        self._acked = 0
        self._refused: Counter[str] = Counter()
        self._unconfirmed = 0
        self.connections = 0
        self.refused_connections = 0
        self._idle = False
        self._closing = False
        self._error: BaseException | None = None
        # Network-thread state.
        self._open: OrderedDict[str, _Speaker] = OrderedDict()  # least recently used first
        self._waiting: deque[tuple[str, bytes]] = deque()  # no room for their connection yet
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="devmeter-sim-mqtt", daemon=True)
        self._thread.start()

    # -- the caller's side --------------------------------------------------------------

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def refused(self) -> dict[str, int]:
        with self._cond:
            return dict(self._refused)

    @property
    def unconfirmed(self) -> int:
        return self._unconfirmed

    def publish(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._published - self._settled < self.window or self._error, 30
            ):
                raise TimeoutError("the broker has not acknowledged a publish for 30 s")
            self._raise_error()
            self._published += 1
            self._inbox.append((topic, payload))
            wake, self._idle = self._idle, False
        if wake:
            # Only when the network thread sleeps in select: one syscall per wake, not per
            # message.
            with contextlib.suppress(BlockingIOError):
                self._wake_w.send(b"\0")

    def drain(self, timeout: float = 60) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._settled >= self._published or self._error, timeout
            ):
                missing = self._published - self._settled
                raise TimeoutError(f"{missing} messages not acknowledged after {timeout:.0f} s")
            self._raise_error()

    def close(self) -> None:
        with self._cond:
            self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(30)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        # A failure of the network thread was raised by publish or drain already; close runs
        # in `finally` blocks and must not hide the error being handled.

    def _raise_error(self) -> None:
        if self._error is not None:
            raise ConnectionError(f"MQTT network thread failed: {self._error}") from self._error

    def _settle(self, *, acked: int = 0, refused: str | None = None, n: int = 1) -> None:
        with self._cond:
            if refused is not None:
                self._refused[refused] += n
            elif acked:
                self._acked += n
            else:
                self._unconfirmed += n
            self._settled += n
            self._cond.notify_all()

    # -- the network thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            next_misc = time.monotonic() + 1.0
            while True:
                with self._cond:
                    batch = list(self._inbox)
                    self._inbox.clear()
                    closing = self._closing
                    busy = bool(batch or self._waiting)
                    self._idle = not busy
                if closing and not busy:
                    break
                self._send_all(batch)
                for key, mask in self._selector.select(0 if busy else 0.2):
                    self._on_ready(key, mask)
                now = time.monotonic()
                if now >= next_misc:
                    self._housekeeping(now)
                    next_misc = now + 1.0
        except BaseException as exc:  # handed to the caller: publish/drain/close raise it
            log.exception("simulator MQTT thread failed")
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            for speaker in list(self._open.values()):
                self._close(speaker)

    def _send_all(self, batch: list[tuple[str, bytes]]) -> None:
        if self._waiting:
            batch = [*self._waiting, *batch]
            self._waiting.clear()
        for n, (topic, payload) in enumerate(batch):
            if not self._send(topic, payload):
                # No room for another connection until a PUBACK frees one: keep the order.
                self._waiting.extend(batch[n:])
                return

    def _send(self, topic: str, payload: bytes) -> bool:
        device_id = speaker_of(topic)
        speaker = self._open.get(device_id)
        if speaker is None:
            if len(self._open) >= self.max_connections and not self._evict():
                return False
            speaker = self._connect(device_id)
            if speaker is None:
                self._settle(refused="connection failed")
                return True
        else:
            self._open.move_to_end(device_id)
        if not speaker.connected:
            speaker.pending.append((topic, payload))
        else:
            self._publish_on(speaker, topic, payload)
        return True

    def _evict(self) -> bool:
        for speaker in self._open.values():
            if speaker.connected and not speaker.inflight and not speaker.pending:
                self._close(speaker)
                return True
        return False

    def _connect(self, device_id: str) -> _Speaker | None:
        username = mqtt_username(self._account, device_id)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=self.address.protocol
        )
        # A device without a key here is one of the simulator's unknown devices: it tries
        # anyway, with a key that cannot be right, and the broker refuses it.
        password = self._keys.get(device_id) or "dmk_unknown-" + secrets.token_urlsafe(16)
        client.username_pw_set(username, password)
        client.max_inflight_messages_set(0)  # bounded by our window, over all connections
        client.max_queued_messages_set(0)
        speaker = _Speaker(device_id, client, connect_started=time.monotonic())
        client.user_data_set(speaker)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        try:
            # A blocking TCP connect (milliseconds on a LAN); CONNECT is then written at once
            # and the CONNACK read by the selector.
            client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
        except OSError as exc:
            log.warning("connection for %s failed: %s", username, exc)
            return None
        sock = client.socket()
        if not isinstance(sock, socket.socket):
            return None
        speaker.sock = sock
        self._open[device_id] = speaker
        self.connections += 1
        self._watch(speaker)
        return speaker

    def _publish_on(self, speaker: _Speaker, topic: str, payload: bytes) -> None:
        speaker.inflight += 1
        info = speaker.client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            speaker.inflight -= 1
            self._settle(refused=f"publish failed: {mqtt.error_string(info.rc)}")
        self._watch(speaker)

    def _watch(self, speaker: _Speaker) -> None:
        """Select for writing only while paho has bytes it could not write yet."""
        if speaker.sock is None:
            return
        events = selectors.EVENT_READ
        if speaker.client.want_write():
            events |= selectors.EVENT_WRITE
        if events == speaker.events:
            return
        if speaker.events:
            self._selector.modify(speaker.sock, events, speaker)
        else:
            self._selector.register(speaker.sock, events, speaker)
        speaker.events = events

    def _on_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        speaker: _Speaker | None = key.data
        if speaker is None:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
            return
        # Each call may close the connection (callbacks below); check it is still open.
        if mask & selectors.EVENT_READ and speaker.sock is not None:
            speaker.client.loop_read(1000)
        if mask & selectors.EVENT_WRITE and speaker.sock is not None:
            speaker.client.loop_write()
        self._watch(speaker)

    def _housekeeping(self, now: float) -> None:
        for speaker in list(self._open.values()):
            if not speaker.connected and now - speaker.connect_started > self._connect_timeout:
                log.warning("no CONNACK for %s", speaker.device_id)
                self._fail_pending(speaker, "connection: no CONNACK")
                self._close(speaker)
                continue
            # Keep-alive pings, and paho's own timeout checks.
            speaker.client.loop_misc()
            self._watch(speaker)

    def _fail_pending(self, speaker: _Speaker, label: str) -> None:
        if speaker.pending:
            self._settle(refused=label, n=len(speaker.pending))
            speaker.pending.clear()

    def _close(self, speaker: _Speaker) -> None:
        self._forget(speaker)
        # Not in a paho callback, so the DISCONNECT is written (and the socket closed) now.
        speaker.client.disconnect()

    def _forget(self, speaker: _Speaker) -> None:
        if self._open.get(speaker.device_id) is speaker:
            del self._open[speaker.device_id]
        if speaker.sock is not None and speaker.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(speaker.sock)
        speaker.sock = None
        speaker.events = 0

    def _on_connect(
        self,
        _client: mqtt.Client,
        speaker: _Speaker,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: object,
    ) -> None:
        if reason.is_failure:
            # Bad or unknown key (0x86 / 0x87): what was waiting for this connection is
            # refused by the broker. paho closes the socket after this callback.
            self.refused_connections += 1
            self._fail_pending(speaker, reason_label(reason, at="connection: "))
            return
        speaker.connected = True
        pending, speaker.pending = speaker.pending, []
        for topic, payload in pending:
            self._publish_on(speaker, topic, payload)

    def _on_publish(
        self, _client: mqtt.Client, speaker: _Speaker, _mid: int, reason: ReasonCode, _p: object
    ) -> None:
        speaker.inflight -= 1
        if reason.is_failure:
            # MQTT 5 says why (0x87: not this identity's topic); 3.1.1 acknowledges and drops.
            self._settle(refused=reason_label(reason))
        else:
            self._settle(acked=1)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        speaker: _Speaker,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: object,
    ) -> None:
        self._forget(speaker)
        self._fail_pending(speaker, reason_label(reason, at="connection: "))
        if speaker.inflight:
            # Sent, never answered (the broker closed the connection: a rotated key, a
            # restart). Not resent: the counts stay exact instead.
            log.warning(
                "%s disconnected (%s) with %d messages unacknowledged",
                speaker.device_id,
                reason,
                speaker.inflight,
            )
            self._settle(n=speaker.inflight)
            speaker.inflight = 0


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft file limit (often 1024) toward ``wanted``, up to the hard one (no
    privilege needed); returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # not on Windows
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return wanted if soft == resource.RLIM_INFINITY else int(soft)


AuthMode = Literal["device", "anonymous"]


def anonymous_refused(url: str, timeout: float = 10.0) -> bool:
    """Whether the broker refuses an anonymous connection (CONNACK failure): it authenticates.

    Raises ``ConnectionError`` when the broker cannot be reached or does not answer.
    """
    address = parse_mqtt_url(url)
    answer: queue.Queue[ReasonCode] = queue.Queue()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"devmeter-sim-probe-{secrets.token_hex(4)}",
        protocol=address.protocol,
    )
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.put(reason)
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"MQTT broker {address.host}:{address.port}: {exc}") from exc
    client.loop_start()
    try:
        reason = answer.get(timeout=timeout)
    except queue.Empty:
        raise ConnectionError(
            f"MQTT broker {address.host}:{address.port} did not answer CONNECT in {timeout:g} s"
        ) from None
    finally:
        client.disconnect()
        client.loop_stop()
    return bool(reason.is_failure)


def choose_auth(
    url: str, requested: str, probe: Callable[[str], bool] = anonymous_refused
) -> AuthMode:
    """``auto``: publish as the devices when the URL names a user (a broker with users is an
    authenticating one, and devmeter's own users may not publish heartbeats) or when the broker
    refuses an anonymous connection; otherwise one anonymous connection."""
    if requested in ("device", "anonymous"):
        return "device" if requested == "device" else "anonymous"
    if requested != "auto":
        raise ValueError(f"unknown auth mode {requested!r}")
    if parse_mqtt_url(url).username:
        return "device"
    return "device" if probe(url) else "anonymous"


def wait_admitted(
    url: str, account_ref: str, device_id: str, key: str, timeout: float = 15.0
) -> float:
    """Wait until the broker admits this device's key; returns the seconds it took.

    A key issued a moment ago reaches the broker through the credential sync (NOTIFY, files
    rewritten, SIGHUP: about a second); publishing before that would count a refused
    connection for every speaker. One probe covers the whole fleet, registered or rotated in
    one transaction, hence in one sync.
    """
    address = parse_mqtt_url(url)
    username = mqtt_username(account_ref, device_id)
    started = time.monotonic()
    last = "no answer"
    while True:
        answer: queue.Queue[ReasonCode] = queue.Queue()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=address.protocol
        )
        client.username_pw_set(username, key)
        client.on_connect = lambda _c, _u, _f, reason, _p, a=answer: a.put(reason)
        try:
            client.connect(address.host, address.port, keepalive=30)
            client.loop_start()
            try:
                reason = answer.get(timeout=5)
                if not reason.is_failure:
                    return time.monotonic() - started
                last = reason_label(reason)
            except queue.Empty:
                pass
            finally:
                client.disconnect()
                client.loop_stop()
        except OSError as exc:
            last = str(exc)
        if time.monotonic() - started > timeout:
            raise ConnectionError(
                f"the broker still refuses {username}'s new key after {timeout:g} s ({last}); "
                "is devmeter's credential sync running for this broker?"
            )
        time.sleep(0.2)


def run_traffic(
    publisher: Sink,
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
    return PublishResult(
        sent,
        publisher.acked,
        time.monotonic() - start,
        refused=publisher.refused,
        unconfirmed=publisher.unconfirmed,
    )
