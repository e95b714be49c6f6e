"""P4's choice of grants, pure: which points pay a month, and in which order."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from metering.credits import Grant, last_payable_month, money_of, plan_use, points_of

CLOSE = datetime(2026, 11, 1, 2, tzinfo=UTC)
LAST_DAY = date(2026, 10, 31)
EARLY = datetime(2026, 10, 1, tzinfo=UTC)


def grant(id: int, remaining: int, expires: date | None, at: datetime = EARLY) -> Grant:
    return Grant(id, remaining, remaining, at, expires)


@pytest.mark.parametrize(
    ("owed", "grants", "uses"),
    [
        (3850, [grant(1, 5000, None)], [(1, 3850)]),  # more points than owed
        (3850, [grant(1, 3850, None)], [(1, 3850)]),  # exactly
        (3850, [grant(1, 1000, None)], [(1, 1000)]),  # fewer
        (0, [grant(1, 1000, None)], []),  # nothing owed
        (-250, [grant(1, 1000, None)], []),  # a refund keeps its points
        # Oldest-expiring first, never-expiring last.
        (
            1500,
            [grant(1, 1000, None), grant(2, 1000, date(2027, 1, 31)), grant(3, 400, LAST_DAY)],
            [(3, 400), (2, 1000), (1, 100)],
        ),
        # Expiry the day before the month's last day: cannot pay; on it and after: can.
        (100, [grant(1, 500, date(2026, 10, 30))], []),
        (100, [grant(1, 500, LAST_DAY)], [(1, 100)]),
        (100, [grant(1, 500, date(2026, 11, 1))], [(1, 100)]),
        # Made after the close: does not exist at it.
        (100, [grant(1, 500, None, datetime(2026, 11, 2, tzinfo=UTC))], []),
        # Same expiry: the older grant first.
        (
            600,
            [grant(2, 500, LAST_DAY, datetime(2026, 10, 5, tzinfo=UTC)), grant(1, 500, LAST_DAY)],
            [(1, 500), (2, 100)],
        ),
    ],
)
def test_plan_use(owed: int, grants: list[Grant], uses: list[tuple[int, int]]) -> None:
    assert plan_use(owed, grants, LAST_DAY, CLOSE) == uses


@pytest.mark.parametrize(
    ("expires", "month"),
    [
        (date(2026, 10, 31), date(2026, 10, 1)),
        (date(2026, 10, 30), date(2026, 9, 1)),
        (date(2026, 11, 1), date(2026, 10, 1)),
        (date(2026, 12, 31), date(2026, 12, 1)),
        (date(2027, 1, 15), date(2026, 12, 1)),
        (date(2028, 2, 29), date(2028, 2, 1)),
    ],
)
def test_last_payable_month(expires: date, month: date) -> None:
    assert last_payable_month(expires) == month


def test_points_are_minor_units() -> None:
    assert points_of(Decimal("3850"), "JPY") == 3850
    assert points_of(Decimal("12.50"), "USD") == 1250
    assert money_of(1250, "USD") == Decimal("12.50")
    assert str(money_of(1000, "JPY")) == "1000"
    with pytest.raises(ValueError, match="minor units"):
        points_of(Decimal("0.5"), "JPY")
