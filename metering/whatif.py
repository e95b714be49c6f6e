"""Tier what-if for one device class: where the current Active count sits in the tier table.

Pure: no database, settings or clock. The console shows it beside a month's usage. By M2/M4
the devices Active now are the ones the next month starts with, so "the tier next month starts
in if nothing changes" is simply the tier of the Active count now; a deactivation now cannot
lower this month's peak, which has already been reached or not.

Amounts are what `price_class` charges for the class at a count (the sum of its rounded
lines), so the what-if agrees with the statement to the unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from devmeter.errors import InvalidError
from metering.catalog import ClassPricing, Tier
from metering.pricing import overage_amount

__all__ = ["WhatIf", "what_if"]


@dataclass(frozen=True, slots=True)
class WhatIf:
    """Tiers are 1-based like `Line.tier`; bounds are inclusive and `tier_to` None is open.

    Zero devices sit in the first tier: it is the one the first device will be priced in.
    """

    active: int
    tier: int
    tier_from: int
    tier_to: int | None
    unit_price: Decimal
    amount: Decimal
    #: Devices to deactivate to be in the previous tier; None in the first tier.
    to_previous: int | None
    amount_at_previous: Decimal | None
    #: Devices more until the next tier starts; None in the last (open) tier.
    to_next: int | None
    amount_at_next: Decimal | None
    #: Devices a contract bills with its term (issue 12): the amounts are what the month
    #: costs above them, priced from commitment + 1 as the statement prices overage.
    committed: int = 0

    @property
    def is_first(self) -> bool:
        return self.to_previous is None

    @property
    def is_last(self) -> bool:
        return self.to_next is None


def what_if(
    device_class: str, pricing: ClassPricing, active: int, currency: str, committed: int = 0
) -> WhatIf:
    if isinstance(active, bool) or not isinstance(active, int) or active < 0:
        raise InvalidError(
            f"active count for {device_class!r} must be a non-negative integer, got {active!r}",
            field="active",
        )
    index, first, tier = _locate(pricing.tiers, active)

    def amount_at(quantity: int) -> Decimal:
        # With nothing committed, the class's usage lines (price_class).
        return overage_amount(device_class, pricing, quantity, committed, currency)

    # The previous tier ends at first - 1: that many devices stay, the rest are deactivated.
    to_previous = active - (first - 1) if index > 1 else None
    to_next = tier.up_to + 1 - active if tier.up_to is not None else None
    return WhatIf(
        active=active,
        tier=index,
        tier_from=first,
        tier_to=tier.up_to,
        unit_price=tier.price,
        amount=amount_at(active),
        to_previous=to_previous,
        amount_at_previous=amount_at(first - 1) if to_previous is not None else None,
        to_next=to_next,
        amount_at_next=amount_at(active + to_next) if to_next is not None else None,
        committed=committed,
    )


def _locate(tiers: tuple[Tier, ...], active: int) -> tuple[int, int, Tier]:
    """(1-based index, first unit, tier) of the tier that holds unit ``active``."""
    first = 1
    for index, tier in enumerate(tiers, start=1):
        if tier.up_to is None or active <= tier.up_to:
            return index, first, tier
        first = tier.up_to + 1
    raise ValueError("tier table without a final open tier")  # the catalog refuses those
