"""What the console's pages print for money, rates and months: pure, a table of asserts."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from console.views import display_money, display_rate, month_label

NBSP = "\u00a0"


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        ("0.10", "10"),  # Japan's consumption tax
        ("0.08", "8"),  # its reduced rate
        ("0.1000", "10"),  # trailing zeros as stored by numeric columns
        ("0.075", "7.5"),
        ("0", "0"),
        ("1", "100"),  # normalize() would write 1E+2
    ],
)
def test_display_rate(rate: str, shown: str) -> None:
    assert display_rate(Decimal(rate)) == f"{shown}{NBSP}%"


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        ("3500", "JPY", "¥3,500"),
        ("-250", "JPY", "-¥250"),
        ("1234.5", "USD", "$1,234.50"),
        ("0", "JPY", "¥0"),
    ],
)
def test_display_money(amount: str, currency: str, shown: str) -> None:
    assert display_money(Decimal(amount), currency) == shown


def test_month_label() -> None:
    assert month_label(date(2026, 10, 1)) == "October 2026"
    assert month_label(date(2027, 1, 31)) == "January 2027"
