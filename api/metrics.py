"""Prometheus metrics of the API: requests by route template and status, and their latency;
and, read from the database, the heartbeats the ingest worker refused.

Why the refusals come from the database and not from the worker's own counter
(``devmeter_ingest_rejections_total``, ingest/worker.py): under `devmeter up` the worker is a
child process with its own registry, and in production there may be several workers on other
hosts. Each row of ``rejected_heartbeats`` is one refusal and the service may never delete one
(devmeter/service_role.sql), so a count per reason is a counter that every worker feeds, that
survives worker restarts (an in-process counter would start again from zero) and that
`devmeter api` shows as well as `devmeter up`, with no extra port to expose or proxy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.rejections import count_by_reason

log = logging.getLogger("devmeter.api")

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "devmeter_api_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "devmeter_api_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)

REJECTED_NAME = "devmeter_rejected_heartbeats"
REJECTED_HELP = "heartbeats refused by ingest and kept in quarantine (all workers), by reason"


class Measure:
    """Counts and times every request by route template and status.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    the rest of the app in a task of its own and passes the response through memory streams,
    which cost more than some whole requests (bench/api.py, issue 11)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            # The route template, not the path: one series per endpoint, not per device id.
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)


class RejectedHeartbeats(Collector):
    """``devmeter_rejected_heartbeats_total{reason}``, counted in the database at scrape time.

    The count is an index-only scan of ``rejected_heartbeats_reason``; it is kept for
    ``max_age_s`` so that several scrapers (a Prometheus HA pair) cost one count. When the
    database cannot answer in time the family is left out rather than failing the scrape: the
    API's own metrics still matter then.
    """

    def __init__(self, pool: ConnectionPool[Any], *, max_age_s: float = 5.0) -> None:
        self.pool = pool
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] | None = None
        self._at = 0.0

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering would call collect(), i.e. query the database
        # before the pool is open.
        return [CounterMetricFamily(REJECTED_NAME, REJECTED_HELP, labels=["reason"])]

    def collect(self) -> Iterable[Metric]:
        counts = self._current()
        if counts is None:
            return []
        family = CounterMetricFamily(REJECTED_NAME, REJECTED_HELP, labels=["reason"])
        for reason, n in sorted(counts.items()):
            family.add_metric([reason], n)
        return [family]

    def _current(self) -> dict[str, int] | None:
        with self._lock:
            if self._counts is not None and time.monotonic() - self._at < self.max_age_s:
                return self._counts
            try:
                with self.pool.connection(timeout=2) as conn, conn.transaction():
                    conn.execute("SET LOCAL statement_timeout = '5s'")
                    self._counts = count_by_reason(conn)
            except Exception as exc:  # any failure: scrape the rest, say why in the log
                log.warning("rejected heartbeats not counted for /metrics: %s", exc)
                return None
            self._at = time.monotonic()
            return self._counts


def database_registry(pool: ConnectionPool[Any]) -> CollectorRegistry:
    """A registry per app (per pool): the module's REGISTRY is shared by every app a test
    process creates, and a collector must query its own app's database."""
    registry = CollectorRegistry()
    registry.register(RejectedHeartbeats(pool))
    return registry
