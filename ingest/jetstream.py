"""NATS JetStream as the durable log between devices and the database (DEVMETER_INGEST_SOURCE).

Devices keep speaking MQTT (NATS's MQTT listener turns topic ``devmeter/v2/a/d/heartbeat`` into
subject ``devmeter.v2.a.d.heartbeat``) or publish to that subject natively. One stream captures
``devmeter.>``, replicated over the cluster; every ``devmeter ingest`` worker pulls from one
durable consumer, so the workers split the load and a message goes to one of them at a time.

A message is acknowledged only after the batch holding it is committed. One that a dead worker
held is redelivered to another after ``ack_wait``, so it may be written twice: the writer
stores a heartbeat once (unique key, ``ON CONFLICT DO NOTHING``; ingest/writer.py). The
consumer never gives up on a message (``max_deliver`` unlimited): a message the processor
refuses is quarantined and acknowledged like any other, so only an unwritable batch is
redelivered, and dropping it after N tries would lose heartbeats.

``received_at`` is the instant the stream stored the message, not when a worker pulled it: a
redelivery or a replay then processes a message exactly as the first delivery did.

nats-py is asyncio; the worker is threads. ``JetStreamSource`` runs the client's loop in a
thread of its own and feeds the worker's queue like ``ingest.mqtt.Subscriber`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)

from ingest.mqtt import Inbound
from ingest.protocol import TOPIC_ROOT

log = logging.getLogger("devmeter.ingest")

#: Everything under the protocol root, as the MQTT path subscribes to ``devmeter/#``: a
#: message on a wrong subject is refused and quarantined, which needs it to be captured.
STREAM_SUBJECTS = [f"{TOPIC_ROOT}.>"]
#: A pull that finds nothing waits this long on the server: short enough that a worker told to
#: stop notices within about a second.
_FETCH_WAIT_S = 1.0
_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class JetStreamOptions:
    #: ``nats://[user:pass@]host:port``, several comma-separated: the cluster's nodes, so the
    #: client reconnects to another when one dies.
    url: str
    stream: str = "DEVMETER_HEARTBEATS"
    consumer: str = "devmeter-ingest"
    replicas: int = 1
    #: A message unacknowledged this long is delivered again (a worker died holding it). Must
    #: exceed the time a batch takes to write, or healthy batches are redelivered (harmless,
    #: stored once, but wasted work).
    ack_wait_s: float = 30.0
    #: Unacknowledged messages the consumer hands out, over all workers.
    max_ack_pending: int = 50_000
    #: How long the log keeps messages, i.e. how far back ``devmeter ingest replay`` reaches.
    max_age_s: float = 7 * 24 * 3600.0
    #: The connection's name, as the server's monitoring shows it.
    name: str = "devmeter-ingest"


def servers(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


def subject_topic(subject: str) -> str:
    """The MQTT topic of a subject, for the processor (which reads MQTT topics).

    NATS maps MQTT's '/' to '.', so a device id holding a '.' cannot be told from a deeper
    topic: such a heartbeat arrives with a wrong topic and is quarantined as ``bad_topic``.
    """
    return subject.replace(".", "/")


def stream_config(options: JetStreamOptions) -> StreamConfig:
    return StreamConfig(
        name=options.stream,
        subjects=STREAM_SUBJECTS,
        storage=StorageType.FILE,
        num_replicas=options.replicas,
        max_age=options.max_age_s,
        # Publishers that retry after a lost PubAck set Nats-Msg-Id; the stream then keeps one.
        duplicate_window=120.0,
    )


def consumer_config(options: JetStreamOptions) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=options.consumer,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=options.ack_wait_s,
        # Unlimited: see the module's docstring.
        max_deliver=-1,
        max_ack_pending=options.max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
    )


async def connect(
    options: JetStreamOptions, *, on_event: Callable[[str], None] | None = None
) -> NatsClient:
    """Connect to any node of the cluster; reconnect forever (a node dies, another answers)."""

    def say(text: str) -> None:
        if on_event is not None:
            on_event(text)

    async def error_cb(exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def disconnected_cb() -> None:
        say("disconnected")
        log.warning("NATS disconnected; reconnecting")

    async def reconnected_cb() -> None:
        say("reconnected")
        log.info("NATS reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = NatsClient()
    await nc.connect(
        servers=servers(options.url),
        name=options.name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        # Typed int in nats-py, used as seconds to sleep: a quarter second is what we mean.
        reconnect_time_wait=0.25,  # type: ignore[arg-type]
        connect_timeout=2,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
    )
    return nc


async def ensure_stream(js: JetStreamContext, options: JetStreamOptions) -> None:
    """Create the stream and the durable consumer if they are missing; leave them otherwise.

    An existing stream is not reconfigured: its replicas and retention are the operator's
    (``nats stream edit``) once it exists.
    """
    try:
        await js.stream_info(options.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(stream_config(options))
        log.info(
            "JetStream stream %s created on %s (replicas %d)",
            options.stream,
            ", ".join(STREAM_SUBJECTS),
            options.replicas,
        )
    try:
        await js.consumer_info(options.stream, options.consumer)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(options.stream, consumer_config(options))
        log.info("JetStream consumer %s created", options.consumer)


async def retrying(
    what: str, action: Callable[[], Awaitable[Any]], stop: Callable[[], bool]
) -> bool:
    """Run ``action`` until it succeeds; False if ``stop`` said so first. A cluster that is
    electing a leader (a node just died, or is just starting) answers with errors meanwhile."""
    attempt = 0
    while not stop():
        try:
            await action()
            return True
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            attempt += 1
            if attempt in (1, 10) or attempt % 60 == 0:
                log.warning("%s: %s (%s); retrying", what, exc or type(exc).__name__, attempt)
            await asyncio.sleep(_RETRY_S)
    return False


def received_at(msg: Msg) -> datetime:
    """When the stream stored the message (see the module's docstring)."""
    try:
        return msg.metadata.timestamp
    except Exception:  # a message not from a stream: cannot happen on a pull consumer
        return datetime.now(UTC)


class JetStreamSource:
    """Pulls from the durable consumer into the worker's queue; acknowledges on request.

    The same duties as ``ingest.mqtt.Subscriber`` (start, pause, stop, ack) for
    ``ingest.worker.IngestWorker``.
    """

    def __init__(self, options: JetStreamOptions, inbox: queue.Queue[Inbound]) -> None:
        self.options = options
        self.inbox = inbox
        #: Set once the consumer is bound: the worker is receiving.
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jetstream", daemon=True
        )
        self._pulling = threading.Event()
        self._pulled = threading.Event()
        self._main: asyncio.Future[None] | None = None
        self._nc: NatsClient | None = None
        #: What the worker holds, by the id its Inbound carries: the message to acknowledge.
        self._held: dict[int, Msg] = {}
        self._held_lock = threading.Lock()
        self._ids = itertools.count(1)

    def start(self) -> None:
        self._thread.start()
        self._pulling.set()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self._loop)  # type: ignore[assignment]

    def pause(self) -> None:
        """Stop pulling (what is in the queue stays to be written and acknowledged)."""
        self._pulling.clear()
        self._pulled.wait(_FETCH_WAIT_S * 5)

    def stop(self) -> None:
        """Send the acknowledgements still queued, then close. Whatever was not acknowledged
        is redelivered, to another worker or to this one when it comes back."""
        self._pulling.clear()
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def ack_batch(self, messages: Sequence[Inbound]) -> None:
        with self._held_lock:
            held = [m for m in (self._held.pop(i.mid, None) for i in messages) if m is not None]
        if held and not self._loop.is_closed():
            # Not awaited: a lost ack only means a redelivery, which is stored once.
            asyncio.run_coroutine_threadsafe(self._ack(held), self._loop)

    async def _ack(self, held: list[Msg]) -> None:
        for msg in held:
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()

    async def _close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)
            await self._nc.close()

    async def _run(self) -> None:
        try:
            await self._pull_forever()
        except Exception:
            log.exception("JetStream pull loop failed")
            raise
        finally:
            self._pulled.set()

    async def _pull_forever(self) -> None:
        def stopped() -> bool:
            return not self._pulling.is_set()

        def on_event(event: str) -> None:
            (self.connected.clear if event == "disconnected" else self.connected.set)()

        while not stopped():
            try:
                self._nc = await connect(self.options, on_event=on_event)
                break
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("NATS not reachable at %s (%s); retrying", self.options.url, exc)
                await asyncio.sleep(_RETRY_S)
        if self._nc is None:
            return
        self.connected.set()
        js = self._nc.jetstream(timeout=5)
        if not await retrying(
            "JetStream stream and consumer", lambda: ensure_stream(js, self.options), stopped
        ):
            return
        sub: JetStreamContext.PullSubscription | None = None

        async def bind() -> None:
            nonlocal sub
            sub = await js.pull_subscribe_bind(
                durable=self.options.consumer, stream=self.options.stream
            )

        if not await retrying("JetStream consumer", bind, stopped):
            return
        assert sub is not None
        self.subscribed.set()
        log.info(
            "JetStream consumer %s of stream %s bound on %s: pulling",
            self.options.consumer,
            self.options.stream,
            self._nc.connected_url.netloc if self._nc.connected_url else "?",
        )
        maxsize = self.inbox.maxsize or 10_000
        while not stopped():
            room = maxsize - self.inbox.qsize()
            if room <= 0:
                # The worker is behind: what stays in the stream waits there, not in memory.
                await asyncio.sleep(0.01)
                continue
            try:
                msgs = await sub.fetch(min(room, 1000), timeout=_FETCH_WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                # A node died or a leader is being elected: the consumer is still there.
                log.warning("JetStream fetch: %s; retrying", exc or type(exc).__name__)
                await asyncio.sleep(_RETRY_S)
                continue
            for msg in msgs:
                mid = next(self._ids)
                with self._held_lock:
                    self._held[mid] = msg
                self.inbox.put_nowait(
                    Inbound(mid, 1, subject_topic(msg.subject), msg.data, received_at(msg), 0)
                )


# ------------------------------------------------------------------------------------ replay


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    messages: int = 0
    heartbeats: int = 0
    duplicates: int = 0
    rejections: int = 0
    #: The stream sequence reached, and the last one there was when the replay began.
    sequence: int = 0
    end_sequence: int = 0


#: A batch read back from the log: (topic, payload, stored at), and the last stream sequence.
Batch = tuple[list[tuple[str, bytes, datetime]], int]


async def read_since(
    options: JetStreamOptions,
    since: datetime,
    handle: Callable[[Batch, int], Awaitable[None]],
    *,
    batch: int = 2000,
) -> int:
    """Read the stream in order from ``since`` to its last message when the call began, handing
    ``handle`` each batch and that end sequence. Returns the end sequence (0: empty stream).

    An ephemeral consumer without acknowledgements: a replay changes nothing on the server,
    and the workers' durable consumer goes on as before.
    """
    nc = await connect(replace(options, name=f"{options.name}-replay"))
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(options.stream)
        end = info.state.last_seq
        if info.state.messages == 0:
            return 0
        sub = await js.pull_subscribe(
            STREAM_SUBJECTS[0],
            stream=options.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since.astimezone(UTC),
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )
        last = 0
        while last < end:
            try:
                msgs = await sub.fetch(batch, timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                break  # nothing (more) stored after `since`
            out = []
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq > end:
                    break
                last = seq
                out.append((subject_topic(msg.subject), msg.data, received_at(msg)))
            if out:
                await handle((out, last), end)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await sub.unsubscribe()
        return end
    finally:
        await nc.close()


def replay(
    database_url: str,
    options: JetStreamOptions,
    since: datetime,
    *,
    progress: Callable[[ReplayProgress], None] = lambda _p: None,
    interval_s: float = 2.0,
) -> ReplayProgress:
    """Process and write again every message stored since ``since``, through the worker's
    processor and idempotent writer: heartbeats already stored are skipped, so replaying twice
    stores nothing new, and a database that lost heartbeats (and the state events derived
    from them) gets them back.

    Refused messages are quarantined again on every replay: the quarantine is a diagnosis
    (``devmeter rejections list``), nothing is billed from it.
    """
    from devmeter.db import connect as db_connect
    from ingest.processor import Heartbeat, Rejection, process
    from ingest.worker import DIRECTORY_REASONS
    from ingest.writer import load_directory, write_batch

    conn = db_connect(database_url)
    directory = load_directory(conn)
    conn.commit()
    done = ReplayProgress()
    last_report = time.monotonic()

    def write(batch: Batch, end: int) -> None:
        nonlocal directory, done, last_report
        messages, sequence = batch
        outs = [process(t, p, at, directory) for t, p, at in messages]
        if any(isinstance(o, Rejection) and o.reason in DIRECTORY_REASONS for o in outs):
            # Devices registered since the directory was read: read it again, once a batch.
            directory = load_directory(conn)
            conn.commit()
            outs = [process(t, p, at, directory) for t, p, at in messages]
        heartbeats: list[Heartbeat] = []
        rejections: list[Rejection] = []
        for out in outs:
            if isinstance(out, Rejection):
                rejections.append(out)
            else:
                heartbeats.extend(out)
        result = write_batch(conn, heartbeats, rejections)
        done = ReplayProgress(
            done.messages + len(messages),
            done.heartbeats + result.heartbeats,
            done.duplicates + result.duplicates,
            done.rejections + result.rejections,
            sequence,
            end,
        )
        if time.monotonic() - last_report >= interval_s:
            last_report = time.monotonic()
            progress(done)

    async def handle(batch: Batch, end: int) -> None:
        await asyncio.to_thread(write, batch, end)

    try:
        end = asyncio.run(read_since(options, since, handle))
    finally:
        conn.close()
    done = replace(done, end_sequence=end)
    progress(done)
    return done
