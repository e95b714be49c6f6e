"""The scheduler (`devmeter scheduler`, and part of `devmeter up`): issues contract charges,
closes months, pushes webhooks.

Every job is safe to run from several schedulers at once and after any gap: issuing charges
and closing take a per-account lock and skip what exists (a charge is unique per contract and
what it is for), webhook deliveries are claimed with SKIP LOCKED.
So there is no leader election; a second scheduler is only redundancy. A job that fails is
logged and simply runs again at its next tick, which is also how a failed account is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler

from devmeter.config import Settings
from devmeter.db import connect
from metering.catalog import Catalog
from metering.statements import close_month, due_months, sweep_racing

log = logging.getLogger("devmeter.scheduler")

WEBHOOK_INTERVAL_S = 30


def close_due(
    connect_db: Callable[[], psycopg.Connection[Any]],
    catalog: Catalog,
    *,
    now: datetime,
    grace: timedelta,
    on_closed: Callable[[psycopg.Connection[Any], int], None] | None = None,
) -> int:
    """Close every month that is due, oldest first; returns how many statements were made.
    First notes the events stored around earlier closes (``sweep_racing``), so that reads and
    this close find them in late_events."""
    with connect_db() as conn:
        try:
            swept, noted = sweep_racing(conn)
        except psycopg.Error:
            # Reads and closes still find those events among the events: only slower.
            log.exception("noting the events stored around earlier closes failed")
            conn.rollback()
        else:
            if swept:
                log.info("noted %d events stored around %d closes as late", noted, swept)
        todo = due_months(conn, now=now, grace=grace)
    made = 0
    for month, refs in todo:
        # All accounts at once: peaks are computed per time zone in one query; accounts that
        # are closed, not due or not yet signed up are skipped by close_month itself.
        report = close_month(connect_db, catalog, month, now=now, grace=grace, on_closed=on_closed)
        made += len(report.closed)
        log.info(
            "closed %s for %d of %d due accounts in %.1f s%s",
            month,
            len(report.closed),
            len(refs),
            report.seconds,
            f"; failed (retried next run): {sorted(report.failed)}" if report.failed else "",
        )
    return made


def webhook_outbox(
    url: str | None,
) -> Callable[[psycopg.Connection[Any], int], None] | None:
    """The ``on_closed`` hook that queues a closed statement for the webhook, in the closing
    transaction (so a delivery exists exactly when its statement does); None without a URL."""
    if not url:
        return None
    from metering.webhook import enqueue

    def on_closed(conn: psycopg.Connection[Any], statement_id: int) -> None:
        enqueue(conn, statement_id, url)

    return on_closed


def charge_outbox(
    url: str | None,
) -> Callable[[psycopg.Connection[Any], int], None] | None:
    """The ``on_issued`` hook that queues an issued charge for the webhook, in the transaction
    that issues it; None without a URL."""
    if not url:
        return None
    from metering.webhook import enqueue_charge

    def on_issued(conn: psycopg.Connection[Any], charge_id: int) -> None:
        enqueue_charge(conn, charge_id, url)

    return on_issued


def issue_due(
    connect_db: Callable[[], psycopg.Connection[Any]],
    catalog: Catalog,
    *,
    now: datetime,
    on_issued: Callable[[psycopg.Connection[Any], int], None] | None = None,
) -> int:
    """Renew terms and issue every contract charge due by ``now``; returns how many were
    issued. A second scheduler doing the same at once issues each charge once."""
    from metering.contracts import issue

    report = issue(connect_db, catalog, until=now, now=now, on_issued=on_issued)
    if report.issued or report.failed:
        log.info(
            "issued %d contract charges%s",
            len(report.issued),
            f"; failed (retried next run): {sorted(report.failed)}" if report.failed else "",
        )
    return len(report.issued)


def build_scheduler(config: Settings, catalog: Catalog, database_url: str) -> BackgroundScheduler:
    grace = timedelta(minutes=config.close_grace_minutes)
    webhook_url = config.webhook_url
    on_closed = webhook_outbox(webhook_url)

    def connect_db() -> psycopg.Connection[Any]:
        return connect(database_url)

    on_issued = charge_outbox(webhook_url)

    def close_job() -> None:
        # Charges first: a term that began with the month is issued before the month closes.
        # A failure to issue (the database away) must not hold the close: both retry next tick.
        try:
            issue_due(connect_db, catalog, now=datetime.now(UTC), on_issued=on_issued)
        except psycopg.Error:
            log.exception("issuing contract charges failed; retried at the next tick")
        close_due(connect_db, catalog, now=datetime.now(UTC), grace=grace, on_closed=on_closed)

    scheduler = BackgroundScheduler(timezone=UTC)
    # coalesce + max_instances=1: a slow run is never stacked behind itself, missed ticks
    # collapse into one; next_run_time=now so a (re)started scheduler catches up at once.
    scheduler.add_job(
        close_job,
        "interval",
        seconds=config.scheduler_interval_s,
        id="close-months",
        coalesce=True,
        max_instances=1,
        next_run_time=datetime.now(UTC),
    )
    if webhook_url:
        if config.webhook_secret is None:
            from devmeter.errors import ConfigError

            raise ConfigError("DEVMETER_WEBHOOK_URL is set but DEVMETER_WEBHOOK_SECRET is not")
        secret = config.webhook_secret.get_secret_value().encode()
        max_attempts = config.webhook_max_attempts

        def webhook_job() -> None:
            from metering.webhook import deliver_due

            deliver_due(connect_db, secret=secret, max_attempts=max_attempts)

        scheduler.add_job(
            webhook_job,
            "interval",
            seconds=WEBHOOK_INTERVAL_S,
            id="deliver-webhooks",
            coalesce=True,
            max_instances=1,
            next_run_time=datetime.now(UTC),
        )
    return scheduler
