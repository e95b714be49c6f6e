"""Tier what-if: every tier edge of the shipped plans, graduated and volume, as tables."""

from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmeter.errors import InvalidError
from metering.catalog import ClassPricing, Tier, load_catalog, parse_catalog
from metering.pricing import class_amount
from metering.whatif import WhatIf, what_if

CATALOG = load_catalog()
LTE = CATALOG.plan("standard").classes["lte-m"]
LTE_VOLUME = CATALOG.plan("standard-volume").classes["lte-m"]
LTE_STARTER = CATALOG.plan("starter").classes["lte-m"]
GATEWAY = CATALOG.plan("standard").classes["gateway"]

D = Decimal


def row(w: WhatIf) -> tuple[object, ...]:
    return (
        w.tier,
        w.tier_from,
        w.tier_to,
        w.amount,
        w.to_previous,
        w.amount_at_previous,
        w.to_next,
        w.amount_at_next,
    )


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        # tier, from, to, amount, to_previous, at previous, to_next, at next
        (0, (1, 1, 10, D(0), None, None, 11, D(3250))),
        (1, (1, 1, 10, D(300), None, None, 10, D(3250))),
        (10, (1, 1, 10, D(3000), None, None, 1, D(3250))),
        (11, (2, 11, 100, D(3250), 1, D(3000), 90, D(25700))),
        # The worked example: 12 Active -> deactivate 2 to be back in 1-10.
        (12, (2, 11, 100, D(3500), 2, D(3000), 89, D(25700))),
        (100, (2, 11, 100, D(25500), 90, D(3000), 1, D(25700))),
        (101, (3, 101, None, D(25700), 1, D(25500), None, None)),
        (500, (3, 101, None, D(105500), 400, D(25500), None, None)),
    ],
)
def test_graduated_tier_edges(active: int, expected: tuple[object, ...]) -> None:
    assert row(what_if("lte-m", LTE, active, "JPY")) == expected


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        (10, (1, 1, 10, D(3000), None, None, 1, D(2750))),
        # Volume: dropping to the previous tier can cost more (10 x 300 > 11 x 250).
        (11, (2, 11, 100, D(2750), 1, D(3000), 90, D(20200))),
        (12, (2, 11, 100, D(3000), 2, D(3000), 89, D(20200))),
        (101, (3, 101, None, D(20200), 1, D(25000), None, None)),
    ],
)
def test_volume_tier_edges(active: int, expected: tuple[object, ...]) -> None:
    assert row(what_if("lte-m", LTE_VOLUME, active, "JPY")) == expected


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        (0, (1, 1, 3, D(0), None, None, 4, D(300))),
        (3, (1, 1, 3, D(0), None, None, 1, D(300))),
        (4, (2, 4, 10, D(300), 1, D(0), 7, D(2350))),
    ],
)
def test_free_allowance_is_the_first_tier(active: int, expected: tuple[object, ...]) -> None:
    assert row(what_if("lte-m", LTE_STARTER, active, "JPY")) == expected


def test_two_tier_class() -> None:
    assert row(what_if("gateway", GATEWAY, 10, "JPY")) == (
        1,
        1,
        10,
        D(5000),
        None,
        None,
        1,
        D(5400),
    )
    assert row(what_if("gateway", GATEWAY, 11, "JPY")) == (
        2,
        11,
        None,
        D(5400),
        1,
        D(5000),
        None,
        None,
    )


def test_single_open_tier_has_neither_neighbour() -> None:
    pricing = ClassPricing(mode="graduated", tiers=(Tier(up_to=None, price=D(100)),))
    w = what_if("wifi", pricing, 7, "JPY")
    assert row(w) == (1, 1, None, D(700), None, None, None, None)
    assert w.is_first
    assert w.is_last
    assert w.unit_price == D(100)


def test_minor_units_are_kept() -> None:
    pro = parse_catalog(
        tomllib.loads(
            """
            [plans.pro]
            currency = "USD"
            [plans.pro.classes.lte-m]
            mode = "graduated"
            tiers = [ { up_to = 2, price = "12.50" }, { price = "0.05" } ]
            """
        ),
        "test.toml",
    ).plan("pro")
    w = what_if("lte-m", pro.classes["lte-m"], 3, "USD")
    assert row(w) == (2, 3, None, D("25.05"), 1, D("25.00"), None, None)
    assert str(w.amount_at_previous) == "25.00"
    assert w.unit_price == D("0.05")


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_refuses_a_count_that_is_not_a_non_negative_int(bad: object) -> None:
    with pytest.raises(InvalidError) as caught:
        what_if("lte-m", LTE, bad, "JPY")  # type: ignore[arg-type]
    assert caught.value.field == "active"


@given(
    pricing=st.sampled_from([LTE, LTE_VOLUME, LTE_STARTER, GATEWAY]),
    active=st.integers(min_value=0, max_value=400),
)
def test_neighbours_are_exactly_the_tier_edges(pricing: ClassPricing, active: int) -> None:
    w = what_if("x", pricing, active, "JPY")
    assert w.tier_from <= max(active, 1)
    assert w.tier_to is None or active <= w.tier_to
    assert w.amount == class_amount("x", pricing, active, "JPY")
    if w.to_previous is not None:
        assert 1 <= w.to_previous <= active
        assert what_if("x", pricing, active - w.to_previous, "JPY").tier == w.tier - 1
        # One device fewer to deactivate would leave it in this tier.
        assert what_if("x", pricing, active - w.to_previous + 1, "JPY").tier == w.tier
    else:
        assert w.tier == 1
    if w.to_next is not None:
        assert w.to_next >= 1
        assert what_if("x", pricing, active + w.to_next, "JPY").tier == w.tier + 1
        assert what_if("x", pricing, active + w.to_next - 1, "JPY").tier == w.tier
    else:
        assert w.tier == len(pricing.tiers)


def test_under_a_contract_the_price_is_what_lies_above_the_commitment() -> None:
    """Issue 12: committed devices are billed with the term; the month bills the rest,
    priced from commitment + 1 (here: 10 committed, 12 Active -> 2 x 250)."""
    pricing = ClassPricing(
        "graduated",
        (Tier(10, Decimal(300)), Tier(100, Decimal(250)), Tier(None, Decimal(200))),
    )
    w = what_if("lte-m", pricing, 12, "JPY", committed=10)
    assert (w.committed, w.amount) == (10, Decimal(500))
    # Two fewer: nothing above the commitment; 89 more reach tier 3 (90 x 250 above 10).
    assert (w.to_previous, w.amount_at_previous) == (2, Decimal(0))
    assert (w.to_next, w.amount_at_next) == (89, Decimal(90 * 250 + 1 * 200))
    # Nothing committed: the usage lines, as without a contract.
    assert what_if("lte-m", pricing, 12, "JPY").amount == Decimal(3500)
