"""The MQTT side of the ingest worker: connect, subscribe, enqueue, acknowledge. Callbacks only.

Messages are acknowledged by the worker after the batch holding them is committed (paho's
``manual_ack``). The session is persistent under a stable client id, so what was not
acknowledged when a worker died is redelivered when it comes back.

The subscription is a plain one by default: a broker restores it with the session after a
restart (Mosquitto from its persistence file), so messages published while the worker
reconnects are queued for it. A shared subscription (``$share/<group>/...``), which lets
several workers split the load, is used only when a group is configured: Mosquitto 2.0.11
does not restore a persistent session's shared subscriptions after a restart, so until the
worker subscribes again what is published is delivered to nobody (docs/protocol.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("devmeter.ingest")

#: Everything under the protocol root: a message on a wrong topic is refused and quarantined,
#: which needs it to arrive.
SUBSCRIPTION = "devmeter/#"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    protocol: MQTTProtocolVersion
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> BrokerAddress:
    """``mqtt://[user:pass@]host[:port][?protocol=5|3.1.1]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"invalid MQTT URL {url!r}: expected mqtt://host:port")
    version = parse_qs(parts.query).get("protocol", ["5"])[0]
    if version not in ("5", "3.1.1"):
        raise ValueError(f"invalid MQTT URL {url!r}: protocol must be 5 or 3.1.1")
    return BrokerAddress(
        parts.hostname,
        parts.port or 1883,
        mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311,
        # A device's username holds a '/', written %2F in a URL.
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Inbound:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: datetime
    #: Which connection delivered it: a packet id is only meaningful on its own connection.
    generation: int


class Subscriber:
    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        share_group: str,
        max_inflight: int,
        session_expiry_s: int,
        inbox: queue.Queue[Inbound],
    ) -> None:
        self.address = parse_mqtt_url(url)
        self.client_id = client_id
        self.inbox = inbox
        self.generation = 0
        self.connected = threading.Event()
        #: Held while the generation changes and while an ack is sent, so that an ack is never
        #: sent on a newer connection than the one that delivered the message.
        self._ack_lock = threading.Lock()
        #: Whether the broker had our session at the last connect (MQTT's session present).
        self.session_present = False
        #: Set once the broker has granted the subscription on the current connection.
        self.subscribed = threading.Event()
        self._topic = f"$share/{share_group}/{SUBSCRIPTION}" if share_group else SUBSCRIPTION
        self._max_inflight = max_inflight
        self._session_expiry_s = session_expiry_s
        v5 = self.address.protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=self.address.protocol,
            # MQTT 3.1.1 has no session expiry: a persistent session is clean_session=False.
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        if self.address.username:
            self.client.username_pw_set(self.address.username, self.address.password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def start(self) -> None:
        properties = None
        kwargs: dict[str, Any] = {}
        if self.address.protocol == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry_s
            # How many unacknowledged messages the broker may push: the worker's queue bound.
            properties.ReceiveMaximum = self._max_inflight
            kwargs = {"clean_start": False, "properties": properties}
        self.client.connect_async(self.address.host, self.address.port, keepalive=30, **kwargs)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def pause(self) -> None:
        """Stop reading from the broker; what it sent and we did not acknowledge it redelivers."""
        self.client.loop_stop()

    def ack_batch(self, messages: Sequence[Inbound]) -> None:
        for message in messages:
            self.ack(message)

    def ack(self, message: Inbound) -> bool:
        """Acknowledge, if the connection that delivered it is still the current one.

        After a reconnect the broker redelivers what was not acknowledged, with the packet ids
        of the old connection; skipping stale acks only costs a duplicate, which is stored once.
        """
        with self._ack_lock:
            if message.generation != self.generation or not self.connected.is_set():
                return False
            self.client.ack(message.mid, message.qos)
            return True

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        with self._ack_lock:
            self.generation += 1
            self.session_present = flags.session_present
        if not flags.session_present and self.generation > 1:
            # The broker forgot us (session expired, or it lost its state): whatever it had
            # queued for this client id is gone. Worth an operator's look: `ingest gaps`.
            log.warning(
                "MQTT session of %r was not present on the broker: messages queued for it "
                "while disconnected are lost (check `devmeter ingest gaps`)",
                self.client_id,
            )
        # Subscribing here means a reconnect subscribes again. With the session present the
        # subscription is still there; subscribing to the same filter again replaces it and
        # keeps what is queued for the session.
        client.subscribe(self._topic, qos=1)
        self.connected.set()
        log.info(
            "connected to MQTT %s:%s as %r (session present: %s), subscribing to %s",
            self.address.host,
            self.address.port,
            self.client_id,
            flags.session_present,
            self._topic,
        )

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.warning("MQTT disconnected (%s); reconnecting", reason)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription to %s refused: %s", self._topic, reasons)
            return
        log.info("subscription to %s granted", self._topic)
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers should refuse these; never let one stop the loop
            topic = bytes(message._topic).decode("utf-8", "replace")
        # Blocks when the queue is full, which stops reading from the socket: back-pressure.
        self.inbox.put(
            Inbound(
                message.mid,
                message.qos,
                topic,
                bytes(message.payload),
                datetime.now(UTC),
                self.generation,
            )
        )


def wait_connected(subscriber: Subscriber, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subscriber.connected.wait(0.1):
            return True
    return False
