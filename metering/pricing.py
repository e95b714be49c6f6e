"""Pricing a month's peaks against a plan (SPEC P1, P2, P5): quantities in, Decimal lines out.

Pure: no database, settings or clock. The caller decides everything that depends on time
(which plan was in force, whether this is the sign-up month, which tax rate applies) and
passes it in, so every rule here is a table of asserts in tests/unit/test_pricing.py.

Money is `Decimal`, never float. Arithmetic runs in a context that traps `Inexact`, so a
product or sum that could not be held exactly raises instead of being rounded silently;
the only rounding is the explicit one in `round_money`, with the rule named by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date
from decimal import (
    ROUND_DOWN,
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    ROUND_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import Final, Literal

from devmeter.errors import InvalidError
from metering.catalog import CURRENCY_MINOR_UNITS, ClassPricing, Plan, Rounding, Tier

__all__ = [
    "Line",
    "LineKind",
    "Priced",
    "class_amount",
    "format_money",
    "overage_amount",
    "price_class",
    "price_month",
    "price_overage",
    "round_money",
    "tax_amount",
]

# "adjustment" is reserved for late heartbeats that change a closed month (SPEC C2); the
# close service creates those lines, this module never does.
LineKind = Literal["usage", "base_fee", "discount", "adjustment", "overage"]

# Precision far beyond any bill; with Inexact trapped, exceeding it is an error, not a rounding.
_EXACT: Final = Context(
    prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact]
)
# For quantize only: rounding there is intended, so Inexact must not trap.
_ROUND: Final = Context(prec=60, traps=[InvalidOperation, DivisionByZero, Overflow])

# Catalog names to decimal modes. "down"/"up" are toward/away from zero, so a negative
# amount (a discount, a negative adjustment) rounds like its positive mirror.
_ROUNDING_MODES: Final[Mapping[Rounding, str]] = {
    "down": ROUND_DOWN,
    "up": ROUND_UP,
    "half_up": ROUND_HALF_UP,
    "half_even": ROUND_HALF_EVEN,
}

_EN_DASH: Final = "\u2013"
_TIMES: Final = "\u00d7"


@dataclass(frozen=True, slots=True)
class Line:
    """One statement line.

    For usage lines `tier` is the 1-based index in the plan's tier table and `tier_from` /
    `tier_to` are that tier's bounds (inclusive; `tier_to` None for the open last tier),
    so the line can be traced back to the catalog. The units a graduated line covers are
    `tier_from .. tier_from + quantity - 1` and a volume line covers `1 .. quantity`; that,
    not the tier's bounds, is what `description` shows.
    """

    kind: LineKind
    device_class: str | None
    description: str
    quantity: int
    unit_price: Decimal
    amount: Decimal
    tier: int | None = None
    tier_from: int | None = None
    tier_to: int | None = None
    #: Adjustment lines (SPEC C2) only: the closed month they correct (its first day), the
    #: quantity billed so far and the corrected one, and that month's tax rate.
    corrects_month: date | None = None
    billed_quantity: int | None = None
    corrected_quantity: int | None = None
    tax_rate: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Priced:
    lines: tuple[Line, ...]
    subtotal: Decimal
    currency: str


def _minor_units(currency: str) -> int:
    try:
        return CURRENCY_MINOR_UNITS[currency]
    except KeyError:
        raise ValueError(f"unknown currency {currency!r}") from None


def _check_decimal(value: object, what: str) -> None:
    # A float has already lost the exact value (0.1 is not 1/10), so it is refused
    # rather than converted; NaN would otherwise pass quietly through quantize.
    if not isinstance(value, Decimal):
        raise TypeError(f"{what} must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"{what} must be a finite Decimal, got {value}")


def _plain(amount: Decimal) -> Decimal:
    """No "-0": a zero amount is stored and exported as 0 whatever sign arithmetic left."""
    return amount.copy_abs() if amount.is_zero() else amount


def round_money(amount: Decimal, currency: str, rounding: Rounding = "half_up") -> Decimal:
    """`amount` at exactly the currency's minor unit: JPY "3500", USD "12.50".

    Quantizing also fixes the exponent, so str() never shows "3.5E+3" however the
    amount was computed.
    """
    _check_decimal(amount, "amount")
    exponent = Decimal(1).scaleb(-_minor_units(currency))
    return _plain(amount.quantize(exponent, rounding=_ROUNDING_MODES[rounding], context=_ROUND))


def tax_amount(subtotal: Decimal, rate: Decimal, currency: str, rounding: Rounding) -> Decimal:
    """Tax on the statement's subtotal, not per line: SPEC P3 rounds once (JP: down)."""
    _check_decimal(subtotal, "subtotal")
    _check_decimal(rate, "rate")
    with localcontext(_EXACT):
        return round_money(subtotal * rate, currency, rounding)


def format_money(d: Decimal, currency: str) -> str:
    """Exact plain digits for JSON/CSV: at least the minor unit ("12.50"), never rounded.

    A catalog price may in principle carry more places than the currency (a unit price of
    0.125 USD); it is shown in full, since the rounding belongs to the line amount.
    """
    _check_decimal(d, "amount")
    places = _minor_units(currency)
    exponent = d.as_tuple().exponent
    if isinstance(exponent, int) and -exponent <= places:
        # Padding to the minor unit adds zeros only, so it cannot round.
        d = d.quantize(Decimal(1).scaleb(-places), context=_EXACT)
    return format(_plain(d), "f")


def _tier_bounds(tiers: tuple[Tier, ...]) -> list[tuple[int, int | None, Tier]]:
    """(first unit, last unit or None, tier) for each tier; tiers are contiguous from 1."""
    bounds: list[tuple[int, int | None, Tier]] = []
    first = 1
    for tier in tiers:
        bounds.append((first, tier.up_to, tier))
        if tier.up_to is not None:
            first = tier.up_to + 1
    return bounds


def _check_quantity(device_class: str, quantity: int) -> None:
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        raise InvalidError(
            f"quantity for {device_class!r} must be a non-negative integer, got {quantity!r}",
            field="quantity",
        )


def price_class(
    device_class: str, pricing: ClassPricing, quantity: int, currency: str
) -> list[Line]:
    """Usage lines for one class's peak: graduated one per tier used, volume a single line.

    A free tier that holds units still gets its (zero) line: it shows the allowance used.
    """
    _check_quantity(device_class, quantity)
    if quantity == 0:
        return []
    bounds = _tier_bounds(pricing.tiers)

    if pricing.mode == "volume":
        # The tier the total reaches prices every unit, so exactly one tier matches.
        index, (first, last, tier) = next(
            (i, b) for i, b in enumerate(bounds, start=1) if b[1] is None or quantity <= b[1]
        )
        with localcontext(_EXACT):
            amount = round_money(quantity * tier.price, currency)
        price = format_money(tier.price, currency)
        return [
            Line(
                kind="usage",
                device_class=device_class,
                description=f"{device_class} {quantity} devices at {price} (volume)",
                quantity=quantity,
                unit_price=tier.price,
                amount=amount,
                tier=index,
                tier_from=first,
                tier_to=last,
            ),
            *_flat_line(device_class, tier, index, first, last, currency),
        ]

    return _graduated_lines(device_class, bounds, 1, quantity, currency, "usage", "")


def _graduated_lines(
    device_class: str,
    bounds: list[tuple[int, int | None, Tier]],
    low: int,
    quantity: int,
    currency: str,
    kind: LineKind,
    note: str,
) -> list[Line]:
    """Units ``low .. quantity``, each at the price of the tier it falls in: a line per tier
    used, and the flat amount of each tier entered within them (one that starts below ``low``
    was entered, and paid for, before)."""
    lines: list[Line] = []
    for index, (first, last, tier) in enumerate(bounds, start=1):
        if first > quantity:
            break
        start = max(first, low)
        covered_to = quantity if last is None else min(last, quantity)
        if start > covered_to:
            continue
        units = covered_to - start + 1
        with localcontext(_EXACT):
            amount = round_money(units * tier.price, currency)
        price = format_money(tier.price, currency)
        lines.append(
            Line(
                kind=kind,
                device_class=device_class,
                description=f"{device_class} {start}{_EN_DASH}{covered_to} {_TIMES} {price}{note}",
                quantity=units,
                unit_price=tier.price,
                amount=amount,
                tier=index,
                tier_from=first,
                tier_to=last,
            )
        )
        if first >= low:
            lines.extend(
                replace(line, kind=kind)
                for line in _flat_line(device_class, tier, index, first, last, currency)
            )
    return lines


def _flat_line(
    device_class: str, tier: Tier, index: int, first: int, last: int | None, currency: str
) -> list[Line]:
    """The tier's flat amount as a line of its own (none when it has none), so the unit
    line still reads quantity x unit price."""
    if tier.flat == 0:
        return []
    span = f"{first}{_EN_DASH}{last}" if last is not None else f"{first}+"
    return [
        Line(
            kind="usage",
            device_class=device_class,
            description=f"{device_class} tier {span} flat amount",
            quantity=1,
            unit_price=tier.flat,
            amount=round_money(tier.flat, currency),
            tier=index,
            tier_from=first,
            tier_to=last,
        )
    ]


def price_overage(
    device_class: str, pricing: ClassPricing, quantity: int, committed: int, currency: str
) -> list[Line]:
    """Overage lines (issue 12): the units of a month's ``quantity`` above the ``committed``
    devices a contract bills in advance, priced from commitment + 1.

    Graduated: each unit above the commitment at the price of the tier it falls in, with the
    flat amount of each tier the overage enters (the commitment paid for the tiers it
    reached). Volume: every unit above the commitment at the tier the whole quantity
    reaches, with that tier's flat amount if the commitment alone did not reach it.
    """
    if isinstance(committed, bool) or not isinstance(committed, int) or committed < 0:
        raise InvalidError(
            f"committed devices for {device_class!r} must be a whole number >= 0", field="commit"
        )
    if committed == 0:
        return [
            replace(line, kind="overage")
            for line in price_class(device_class, pricing, quantity, currency)
        ]
    _check_quantity(device_class, quantity)
    if quantity <= committed:
        return []
    bounds = _tier_bounds(pricing.tiers)
    note = f" above {committed} committed"
    if pricing.mode == "graduated":
        return _graduated_lines(
            device_class, bounds, committed + 1, quantity, currency, "overage", note
        )
    index, (first, last, tier) = next(
        (i, b) for i, b in enumerate(bounds, start=1) if b[1] is None or quantity <= b[1]
    )
    units = quantity - committed
    with localcontext(_EXACT):
        amount = round_money(units * tier.price, currency)
    price = format_money(tier.price, currency)
    line = Line(
        kind="overage",
        device_class=device_class,
        description=f"{device_class} {committed + 1}{_EN_DASH}{quantity} {_TIMES} {price}{note}",
        quantity=units,
        unit_price=tier.price,
        amount=amount,
        tier=index,
        tier_from=first,
        tier_to=last,
    )
    # The tier's flat amount, unless the commitment alone reached the tier (and paid it).
    flat = _flat_line(device_class, tier, index, first, last, currency) if committed < first else []
    return [line, *(replace(x, kind="overage") for x in flat)]


def overage_amount(
    device_class: str, pricing: ClassPricing, quantity: int, committed: int, currency: str
) -> Decimal:
    """What a class's month costs above ``committed`` devices: the sum of its overage lines
    (with nothing committed, its usage lines)."""
    lines = price_overage(device_class, pricing, quantity, committed, currency)
    return round_money(sum((line.amount for line in lines), Decimal(0)), currency)


def class_amount(device_class: str, pricing: ClassPricing, quantity: int, currency: str) -> Decimal:
    """The class's monthly amount at ``quantity`` units: the sum of its priced lines."""
    lines = price_class(device_class, pricing, quantity, currency)
    return round_money(sum((line.amount for line in lines), Decimal(0)), currency)


def price_month(
    plan: Plan,
    peaks: Mapping[str, int],
    *,
    signup_month_free: bool = False,
    commitments: Mapping[str, int] | None = None,
) -> Priced:
    """Lines and subtotal (tax-excluded, SPEC P2) for one month's peak per device class.

    `signup_month_free` is the caller's decision (plan.free_signup_month and this is the
    sign-up month, SPEC P5); it adds a discount line that brings the subtotal to 0, so the
    statement still shows what the month would have cost.

    `commitments` (issue 12) is given for a month under a contract: its fee and committed
    devices are billed in advance as charges, so the month has no base fee line, and a class
    with committed devices bills only the peak above them (overage lines).
    """
    unknown = sorted(cls for cls in peaks if cls not in plan.classes)
    if unknown:
        raise InvalidError(
            f"device class {unknown[0]!r} is not priced by plan {plan.name!r} "
            f"(priced: {', '.join(sorted(plan.classes))})",
            field="device_class",
        )
    currency = plan.currency
    lines: list[Line] = []
    if plan.base_fee > 0 and commitments is None:
        fee = round_money(plan.base_fee, currency)
        lines.append(
            Line(
                kind="base_fee",
                device_class=None,
                description=f"base fee {plan.name}",
                quantity=1,
                unit_price=plan.base_fee,
                amount=fee,
            )
        )
    # Sorted so a statement (and its export checksum) does not depend on dict order.
    for device_class in sorted(peaks):
        pricing = plan.classes[device_class]
        committed = (commitments or {}).get(device_class, 0)
        if committed > 0:
            lines.extend(
                price_overage(device_class, pricing, peaks[device_class], committed, currency)
            )
        else:
            lines.extend(price_class(device_class, pricing, peaks[device_class], currency))
    if signup_month_free:
        discount = _subtotal(lines, currency).copy_negate()
        lines.append(
            Line(
                kind="discount",
                device_class=None,
                description="sign-up month free (100 % discount)",
                quantity=1,
                unit_price=_plain(discount),
                amount=_plain(discount),
            )
        )
    return Priced(lines=tuple(lines), subtotal=_subtotal(lines, currency), currency=currency)


def _subtotal(lines: list[Line], currency: str) -> Decimal:
    # The sum of the already-rounded line amounts, never a rounding of the unrounded
    # total: the statement must add up line by line, as the customer will check it.
    with localcontext(_EXACT):
        total = sum((line.amount for line in lines), Decimal(0))
    return round_money(total, currency)
