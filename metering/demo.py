"""The SPEC's worked example as a demo account: a month of history, 1,000 credit points, closed.

``devmeter demo`` ends the five-minute demo with a priced, closed statement: subtotal 3,500,
tax 350, credit points 1,000, amount due 2,850. The example's October is replayed in the
latest month that can be closed now (its end in Tokyo plus the grace period), so the demo
works on any day; its owner's key signs in to the console to see the same statement there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from devmeter.errors import ConflictError
from metering import credits
from metering.catalog import Catalog
from metering.registry import create_account, register_device, set_device_state
from metering.statements import (
    DEFAULT_GRACE,
    CloseReport,
    close_month,
    current_month,
    month_start,
)

Conn = psycopg.Connection[Any]
TZ = "Asia/Tokyo"
POINTS = 1000


@dataclass(frozen=True, slots=True)
class Demo:
    account: str
    owner_key: str
    month: str
    report: CloseReport


def demo_month(now: datetime, grace: timedelta = DEFAULT_GRACE) -> str:
    """The latest month in Tokyo that has ended, grace included, at ``now``."""
    month = current_month(TZ, now - grace)
    first = month_start(month)
    previous = (first - timedelta(days=1)).replace(day=1)
    return f"{previous.year:04d}-{previous.month:02d}"


def create_demo(
    connect: Callable[[], Conn],
    catalog: Catalog,
    *,
    ref: str,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
) -> Demo:
    """Create account ``ref`` with the worked example's month, grant the points, close it."""
    month = demo_month(now, grace)
    first = month_start(month)
    zone = ZoneInfo(TZ)

    def at(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
        return datetime.combine(day, time(hour, minute, second), zone)

    def day(n: int) -> date:
        return first + timedelta(days=n - 1)

    last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    signed_up = (first - timedelta(days=1)).replace(day=1)
    with connect() as conn, conn.transaction():
        exists = conn.execute("SELECT 1 FROM accounts WHERE ref = %s", (ref,)).fetchone()
        if exists:
            raise ConflictError(
                f"account {ref!r} already exists: give the demo another --account", field="account"
            )
        created = create_account(
            conn,
            catalog,
            ref=ref,
            name="Worked example",
            plan="standard",
            country="JP",
            timezone=TZ,
            signed_up_on=signed_up,
        )

        def register(numbers: range, when: datetime) -> None:
            for n in numbers:
                register_device(
                    conn,
                    catalog,
                    account_ref=ref,
                    device_class="lte-m",
                    device_id=f"d{n}",
                    at=when,
                )

        def deactivate(numbers: range, when: datetime, source: Any) -> None:
            for n in numbers:
                set_device_state(
                    conn,
                    device_id=f"d{n}",
                    account_id=created.account.id,
                    state="inactive",
                    at=when,
                    source=source,
                )

        register(range(1, 9), at(first - timedelta(days=1), 10))
        register(range(9, 13), at(day(5), 9))
        deactivate(range(1, 5), at(day(10), 12), "console")
        register(range(13, 17), at(day(20), 8))
        deactivate(range(5, 6), at(day(25), 18), "heartbeat")
        register(range(17, 18), at(last, 23, 59, 59))
        credits.grant(
            conn,
            created.account,
            points=POINTS,
            reason="demo: welcome points",
            expires_on=None,
            at=at(first, 0),
            now=now,
        )
    report = close_month(connect, catalog, month, now=now, account_ref=ref, grace=grace)
    return Demo(ref, created.api_key, month, report)
