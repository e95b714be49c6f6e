"""The scheduler closes due months by itself, catches up after downtime, and never twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devmeter.config import Settings
from devmeter.db import connect
from devmeter.errors import ConfigError
from metering.catalog import load_catalog
from metering.scheduler import build_scheduler, close_due
from tests.integration.test_close import worked_example
from tests.integration.test_ingest_worker import count, poll

CATALOG = load_catalog()


def test_close_due_catches_up_month_by_month(database_url: str) -> None:
    worked_example(database_url)

    def opener() -> psycopg.Connection[Any]:
        return connect(database_url)

    now = datetime(2026, 11, 22, tzinfo=UTC)
    assert close_due(opener, CATALOG, now=now, grace=timedelta(hours=2)) == 2
    assert close_due(opener, CATALOG, now=now, grace=timedelta(hours=2)) == 0
    months = "SELECT count(*) FROM statements WHERE month IN ('2026-09-01', '2026-10-01')"
    assert count(database_url, months) == 2


def test_the_scheduler_closes_months_on_its_own(database_url: str) -> None:
    worked_example(database_url)
    config = Settings(scheduler_interval_s=1)
    scheduler = build_scheduler(config, CATALOG, database_url)
    scheduler.start()
    try:
        poll(
            lambda: count(database_url, "SELECT count(*) FROM statements") >= 2,
            30,
            "the scheduler to close September and October",
        )
    finally:
        scheduler.shutdown(wait=True)
    subtotal = count(
        database_url, "SELECT subtotal::int FROM statements WHERE month = '2026-10-01'"
    )
    assert subtotal == 3500


def test_a_webhook_without_a_secret_is_refused(database_url: str) -> None:
    config = Settings(webhook_url="http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError, match="DEVMETER_WEBHOOK_SECRET"):
        build_scheduler(config, CATALOG, database_url)
