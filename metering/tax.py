"""Tax on a billing period (SPEC P3). Pure: a tax table, a period and an amount in; Decimal out.

Prices are tax-excluded (P2). A period is taxed at the rate in force on its first day (in the
account's time zone, the day its billing month starts), so a rate change applies from the next
period; the tax is computed once on the period's taxable amount and rounded per jurisdiction
(Japan: down), never per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from metering.catalog import TaxTable
from metering.pricing import tax_amount


@dataclass(frozen=True, slots=True)
class PeriodTax:
    rate: Decimal
    amount: Decimal


def period_tax(table: TaxTable, first_day: date, taxable: Decimal, currency: str) -> PeriodTax:
    """The tax of a period that starts on ``first_day`` on ``taxable`` (tax-excluded)."""
    rate = table.rate_on(first_day)
    return PeriodTax(rate.rate, tax_amount(taxable, rate.rate, currency, rate.rounding))
