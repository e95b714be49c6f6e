"""The ingest worker: MQTT in, batches of heartbeats out, acknowledgements after commit.

"MQTT in" is Mosquitto through paho by default (ingest/mqtt.py); with
DEVMETER_INGEST_SOURCE=jetstream it is a NATS JetStream durable consumer that several workers
share (ingest/jetstream.py). Both fill the same queue and take the same acknowledgements.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from devmeter.db import connect
from ingest.mqtt import Inbound, Subscriber
from ingest.processor import DeviceInfo, DeviceKey, Heartbeat, Reason, Rejection, process
from ingest.writer import load_directory, write_batch

log = logging.getLogger("devmeter.ingest")

#: A refusal that a newer device directory could turn into an acceptance.
DIRECTORY_REASONS = {Reason.UNKNOWN_DEVICE, Reason.NOT_BOUND, Reason.NOT_A_GATEWAY}
_DIRECTORY_REFRESH_S = 1.0
_RETRY_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class IngestOptions:
    client_id: str
    #: Empty: a plain subscription, which a broker restart keeps (see ingest/mqtt.py).
    share_group: str = ""
    batch_size: int = 2000
    batch_age_s: float = 0.2
    max_inflight: int = 20_000
    session_expiry_s: int = 7 * 24 * 3600
    log_interval_s: float = 10.0


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.messages = Counter("devmeter_ingest_messages", "MQTT messages received", registry=r)
        self.rows = Counter("devmeter_ingest_heartbeats", "heartbeats stored (new)", registry=r)
        self.duplicates = Counter(
            "devmeter_ingest_duplicates", "heartbeats already stored (redelivered)", registry=r
        )
        self.events = Counter("devmeter_ingest_state_events", "state events derived", registry=r)
        self.rejections = Counter(
            "devmeter_ingest_rejections", "messages refused", ["reason"], registry=r
        )
        self.batch_seconds = Histogram(
            "devmeter_ingest_batch_seconds", "time to write and commit a batch", registry=r
        )
        self.queue_depth = Gauge("devmeter_ingest_queue_depth", "messages waiting", registry=r)
        self.db_errors = Counter(
            "devmeter_ingest_database_errors", "failed batch writes (retried)", registry=r
        )
        # Plain running totals for the periodic log line and for tests.
        self.total_messages = 0
        self.total_rows = 0
        self.total_batches = 0
        self.total_batch_seconds = 0.0
        self.total_rejections: dict[str, int] = {}


class Source(Protocol):
    """Where messages come from: it fills the worker's queue and takes acknowledgements."""

    #: Set while messages can arrive (subscription granted, consumer bound).
    subscribed: threading.Event

    def start(self) -> None: ...

    def pause(self) -> None:
        """Stop taking messages in; what is queued is still written and acknowledged."""

    def stop(self) -> None: ...

    def ack_batch(self, messages: Sequence[Inbound]) -> None:
        """Acknowledge messages whose batch is committed."""


class IngestWorker:
    def __init__(
        self,
        database_url: str,
        mqtt_url: str | None,
        options: IngestOptions,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        source: Callable[[queue.Queue[Inbound]], Source] | None = None,
    ) -> None:
        """``source`` makes the source of messages from the worker's queue; by default an MQTT
        subscriber to ``mqtt_url``."""
        self.database_url = database_url
        self.options = options
        self.metrics = metrics or Metrics()
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=options.max_inflight)
        self.subscriber: Source
        if source is not None:
            self.subscriber = source(self.inbox)
        elif mqtt_url is None:
            raise ValueError("an MQTT URL or another source is needed")
        else:
            self.subscriber = Subscriber(
                mqtt_url,
                client_id=options.client_id,
                share_group=options.share_group,
                max_inflight=options.max_inflight,
                session_expiry_s=options.session_expiry_s,
                inbox=self.inbox,
            )
        self._clock = clock
        self._conn: psycopg.Connection[dict[str, object]] | None = None
        self._directory: dict[DeviceKey, DeviceInfo] = {}
        self._directory_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then write and acknowledge what was already received."""
        self._refresh_directory(stop, force=True)
        self.subscriber.start()
        reporter = _Reporter(self.metrics, self.inbox, self.options.log_interval_s)
        try:
            while not stop.is_set():
                batch = self._collect(stop)
                if batch:
                    self._flush(batch, stop)
                reporter.maybe_log()
            self.subscriber.pause()
            leftover = self._drain()
            if leftover:
                self._flush(leftover, stop)
        finally:
            self.subscriber.stop()
            if self._conn is not None:
                self._conn.close()

    def _collect(self, stop: threading.Event) -> list[Inbound]:
        try:
            first = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        # The age limit counts from when the first message arrived, not from when it was
        # dequeued: one that waited out the previous write must not wait a full age again.
        # Past the limit, what is already queued still goes in (no waiting for more).
        waited = (datetime.now(UTC) - first.received_at).total_seconds()
        deadline = time.monotonic() + max(0.0, self.options.batch_age_s - waited)
        while len(batch) < self.options.batch_size and not stop.is_set():
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    batch.append(self.inbox.get(timeout=remaining))
                else:
                    batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _drain(self) -> list[Inbound]:
        out: list[Inbound] = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _flush(self, batch: list[Inbound], stop: threading.Event) -> None:
        self.metrics.messages.inc(len(batch))
        self.metrics.queue_depth.set(self.inbox.qsize())
        heartbeats, rejections = self._process(batch, stop)
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                result = write_batch(self._connection(), heartbeats, rejections)
                break
            except psycopg.Error as exc:
                # Nothing is acknowledged: keep the batch and retry until the database is back.
                self.metrics.db_errors.inc()
                self._drop_connection()
                attempt += 1
                delay = min(_RETRY_MAX_S, 0.1 * 2**attempt)
                log.warning(
                    "batch of %d not written (%s); retry %d in %.1fs",
                    len(batch),
                    str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    attempt,
                    delay,
                )
                if stop.wait(delay):
                    # Shutting down: leave it unacknowledged for the broker to redeliver.
                    return
        m = self.metrics
        elapsed = time.monotonic() - started
        m.batch_seconds.observe(elapsed)
        m.rows.inc(result.heartbeats)
        m.duplicates.inc(result.duplicates)
        m.events.inc(result.events)
        m.total_messages += len(batch)
        m.total_rows += result.heartbeats
        m.total_batches += 1
        m.total_batch_seconds += elapsed
        for rejection in rejections:
            m.rejections.labels(rejection.reason.value).inc()
            m.total_rejections[rejection.reason.value] = (
                m.total_rejections.get(rejection.reason.value, 0) + 1
            )
        self.subscriber.ack_batch(batch)

    def _process(
        self, batch: list[Inbound], stop: threading.Event
    ) -> tuple[list[Heartbeat], list[Rejection]]:
        heartbeats: list[Heartbeat] = []
        rejections: list[Rejection] = []
        retry: list[Inbound] = []
        for message in batch:
            out = process(message.topic, message.payload, message.received_at, self._directory)
            if isinstance(out, Rejection):
                if out.reason in DIRECTORY_REASONS:
                    retry.append(message)
                else:
                    rejections.append(out)
            else:
                heartbeats.extend(out)
        if retry:
            # Maybe a device registered since the directory was loaded: look again. Refreshes
            # are rate-limited; waiting out the limit (at most once per batch) rather than
            # refusing means a just-registered device is never quarantined.
            wait = self._directory_at + _DIRECTORY_REFRESH_S - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            self._refresh_directory(stop)
            for message in retry:
                out = process(message.topic, message.payload, message.received_at, self._directory)
                if isinstance(out, Rejection):
                    rejections.append(out)
                else:
                    heartbeats.extend(out)
        return heartbeats, rejections

    def _refresh_directory(self, stop: threading.Event, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._directory_at < _DIRECTORY_REFRESH_S:
            return
        attempt = 0
        while not stop.is_set():
            try:
                self._directory = load_directory(self._connection())
                self._connection().commit()
                self._directory_at = time.monotonic()
                return
            except psycopg.Error as exc:
                self._drop_connection()
                attempt += 1
                if not force:
                    log.warning("device directory not refreshed: %s", exc)
                    return
                log.warning("database not reachable (%s); retry %d", exc, attempt)
                stop.wait(min(_RETRY_MAX_S, 0.1 * 2**attempt))

    def _connection(self) -> psycopg.Connection[dict[str, object]]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.database_url)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class _Reporter:
    """One log line per interval: what an operator watching the worker wants to see."""

    def __init__(self, metrics: Metrics, inbox: queue.Queue[Inbound], interval: float) -> None:
        self.metrics, self.inbox, self.interval = metrics, inbox, interval
        self.last = time.monotonic()
        self.seen = (0, 0, 0, 0.0)

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        m = self.metrics
        current = (m.total_messages, m.total_rows, m.total_batches, m.total_batch_seconds)
        messages, rows, batches, seconds = (a - b for a, b in zip(current, self.seen, strict=True))
        elapsed = now - self.last
        log.info(
            "ingest: %.0f msg/s, %.0f rows/s, mean batch %.1f ms, queue %d, rejected %s",
            messages / elapsed,
            rows / elapsed,
            1000 * seconds / batches if batches else 0.0,
            self.inbox.qsize(),
            m.total_rejections or "none",
        )
        self.last, self.seen = now, current
