"""SPEC P3: the rate in force on the period's first day, once on the subtotal, rounded per
jurisdiction (Japan: down)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from metering.catalog import TaxRate, TaxRateNotFoundError, TaxTable
from metering.tax import period_tax

JP = TaxTable(
    "JP",
    (
        TaxRate(date(2014, 4, 1), Decimal("0.08"), "down"),
        TaxRate(date(2019, 10, 1), Decimal("0.10"), "down"),
        # A made-up change in the middle of a month, to show it waits for the next period.
        TaxRate(date(2026, 11, 15), Decimal("0.12"), "down"),
        # Made-up changes on the 1st and on the 2nd of a month.
        TaxRate(date(2027, 3, 1), Decimal("0.15"), "down"),
        TaxRate(date(2027, 5, 2), Decimal("0.20"), "down"),
    ),
)
US = TaxTable("US", (TaxRate(date(2000, 1, 1), Decimal("0.0725"), "half_up"),))


@pytest.mark.parametrize(
    ("table", "first_day", "taxable", "currency", "rate", "amount"),
    [
        (JP, date(2026, 10, 1), "3500", "JPY", "0.10", "350"),  # the SPEC's worked example
        (JP, date(2026, 10, 1), "3333", "JPY", "0.10", "333"),  # 333.3: down
        (JP, date(2026, 10, 1), "3339", "JPY", "0.10", "333"),  # 333.9: still down
        (JP, date(2026, 10, 1), "0", "JPY", "0.10", "0"),  # a free month owes no tax
        (JP, date(2019, 9, 1), "1000", "JPY", "0.08", "80"),  # before the 2019 change
        (JP, date(2019, 10, 1), "1000", "JPY", "0.10", "100"),  # a change on the first day
        (JP, date(2026, 11, 1), "1000", "JPY", "0.10", "100"),  # a mid-month change waits ...
        (JP, date(2026, 12, 1), "1000", "JPY", "0.12", "120"),  # ... for the next period
        (JP, date(2019, 9, 1), "3333", "JPY", "0.08", "266"),  # 266.64: down
        (JP, date(2027, 2, 1), "1000", "JPY", "0.12", "120"),  # the month before a change ...
        (JP, date(2027, 3, 1), "1000", "JPY", "0.15", "150"),  # ... on the 1st: that month
        (JP, date(2027, 5, 1), "1000", "JPY", "0.15", "150"),  # a change on the 2nd ...
        (JP, date(2027, 6, 1), "1000", "JPY", "0.20", "200"),  # ... from the next month
        (US, date(2026, 10, 1), "10.10", "USD", "0.0725", "0.73"),  # 0.732: half up to cents
        (US, date(2026, 10, 1), "10.00", "USD", "0.0725", "0.73"),  # 0.725: half up
    ],
)
def test_period_tax(
    table: TaxTable,
    first_day: date,
    taxable: str,
    currency: str,
    rate: str,
    amount: str,
) -> None:
    tax = period_tax(table, first_day, Decimal(taxable), currency)
    assert (tax.rate, tax.amount) == (Decimal(rate), Decimal(amount))


def test_a_period_before_the_first_rate_is_refused_not_taxed_at_zero() -> None:
    with pytest.raises(TaxRateNotFoundError, match="JP"):
        period_tax(JP, date(2014, 3, 1), Decimal(1000), "JPY")
