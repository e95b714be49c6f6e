"""Pricing (SPEC P1, P2, P5): every tier edge, every rounding rule, as tables of asserts."""

from __future__ import annotations

import tomllib
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmeter.errors import InvalidError
from metering.catalog import (
    Catalog,
    CatalogError,
    ClassPricing,
    Mode,
    Plan,
    Rounding,
    Tier,
    load_catalog,
    parse_catalog,
)
from metering.pricing import (
    Line,
    Priced,
    format_money,
    price_class,
    price_month,
    price_overage,
    round_money,
    tax_amount,
)

CATALOG = load_catalog()
STANDARD = CATALOG.plan("standard")
VOLUME = CATALOG.plan("standard-volume")
STARTER = CATALOG.plan("starter")

USD_TOML = """\
[plans.pro]
currency = "USD"
base_fee = "9.90"
free_signup_month = false

[plans.pro.classes.lte-m]
mode = "graduated"
tiers = [ { up_to = 2, price = "12.50" }, { price = "0.05" } ]

[plans.pro.classes.wifi]
mode = "volume"
tiers = [ { up_to = 5, price = "1.25" }, { price = "1" } ]
"""


def catalog(text: str) -> Catalog:
    return parse_catalog(tomllib.loads(text), "test.toml")


def summary(lines: list[Line] | tuple[Line, ...]) -> list[tuple[int, str, str]]:
    """(quantity, unit price, amount) per line, as the statement would print them."""
    return [(line.quantity, str(line.unit_price), str(line.amount)) for line in lines]


def assert_exact(priced: Priced) -> None:
    """Money is Decimal with plain digits: no float, no exponent, no "-0"."""
    amounts = [priced.subtotal] + [x for ln in priced.lines for x in (ln.unit_price, ln.amount)]
    for amount in amounts:
        assert type(amount) is Decimal
        assert "E" not in str(amount)
        assert not str(amount).startswith("-0")
    for line in priced.lines:
        assert type(line.quantity) is int


# --- the SPEC's worked example -----------------------------------------------------


def test_worked_example_graduated() -> None:
    priced = price_month(STANDARD, {"lte-m": 12})
    assert [line.description for line in priced.lines] == [
        "lte-m 1\u201310 \u00d7 300",
        "lte-m 11\u201312 \u00d7 250",
    ]
    assert summary(priced.lines) == [(10, "300", "3000"), (2, "250", "500")]
    assert [(ln.tier, ln.tier_from, ln.tier_to) for ln in priced.lines] == [
        (1, 1, 10),
        (2, 11, 100),
    ]
    assert {line.kind for line in priced.lines} == {"usage"}
    assert {line.device_class for line in priced.lines} == {"lte-m"}
    assert priced.subtotal == Decimal("3500")
    assert str(priced.subtotal) == "3500"
    assert priced.currency == "JPY"
    assert_exact(priced)


def test_worked_example_volume() -> None:
    priced = price_month(VOLUME, {"lte-m": 12})
    (line,) = priced.lines
    assert line.description == "lte-m 12 devices at 250 (volume)"
    assert (line.quantity, line.unit_price, line.amount) == (12, Decimal(250), Decimal(3000))
    assert (line.tier, line.tier_from, line.tier_to) == (2, 11, 100)
    assert str(priced.subtotal) == "3000"
    assert_exact(priced)


def test_worked_example_tax() -> None:
    rate = CATALOG.tax_table("JP").rate_on(date(2026, 10, 1))
    tax = tax_amount(Decimal(3500), rate.rate, "JPY", rate.rounding)
    assert tax == Decimal(350)
    assert str(tax) == "350"


# --- tier edges ----------------------------------------------------------------------

LTE_M = STANDARD.classes["lte-m"]
LTE_M_VOLUME = VOLUME.classes["lte-m"]


@pytest.mark.parametrize(
    ("quantity", "expected", "tiers"),
    [
        (1, [(1, "300", "300")], [(1, 1, 10)]),
        (10, [(10, "300", "3000")], [(1, 1, 10)]),
        (11, [(10, "300", "3000"), (1, "250", "250")], [(1, 1, 10), (2, 11, 100)]),
        (100, [(10, "300", "3000"), (90, "250", "22500")], [(1, 1, 10), (2, 11, 100)]),
        (
            101,
            [(10, "300", "3000"), (90, "250", "22500"), (1, "200", "200")],
            [(1, 1, 10), (2, 11, 100), (3, 101, None)],
        ),
    ],
)
def test_graduated_tier_edges(
    quantity: int,
    expected: list[tuple[int, str, str]],
    tiers: list[tuple[int, int, int | None]],
) -> None:
    lines = price_class("lte-m", LTE_M, quantity, "JPY")
    assert summary(lines) == expected
    assert [(ln.tier, ln.tier_from, ln.tier_to) for ln in lines] == tiers


def test_graduated_description_shows_units_covered() -> None:
    lines = price_class("lte-m", LTE_M, 101, "JPY")
    assert [line.description for line in lines] == [
        "lte-m 1\u201310 \u00d7 300",
        "lte-m 11\u2013100 \u00d7 250",
        "lte-m 101\u2013101 \u00d7 200",
    ]


@pytest.mark.parametrize(
    ("quantity", "unit_price", "amount", "tier"),
    [
        (1, "300", "300", (1, 1, 10)),
        (10, "300", "3000", (1, 1, 10)),
        (11, "250", "2750", (2, 11, 100)),
        (100, "250", "25000", (2, 11, 100)),
        (101, "200", "20200", (3, 101, None)),
    ],
)
def test_volume_tier_edges(
    quantity: int, unit_price: str, amount: str, tier: tuple[int, int, int | None]
) -> None:
    (line,) = price_class("lte-m", LTE_M_VOLUME, quantity, "JPY")
    assert summary([line]) == [(quantity, unit_price, amount)]
    assert (line.tier, line.tier_from, line.tier_to) == tier
    assert line.description == f"lte-m {quantity} devices at {unit_price} (volume)"


@pytest.mark.parametrize("pricing", [LTE_M, LTE_M_VOLUME], ids=["graduated", "volume"])
def test_zero_devices_gives_no_usage_lines(pricing: ClassPricing) -> None:
    assert price_class("lte-m", pricing, 0, "JPY") == []


def test_zero_devices_month_is_zero() -> None:
    priced = price_month(STANDARD, {"lte-m": 0, "wifi": 0})
    assert priced.lines == ()
    assert str(priced.subtotal) == "0"
    assert price_month(STANDARD, {}).subtotal == Decimal(0)


@pytest.mark.parametrize("quantity", [-1, True])
def test_bad_quantity_refused(quantity: int) -> None:
    with pytest.raises(InvalidError) as exc:
        price_class("lte-m", LTE_M, quantity, "JPY")
    assert exc.value.field == "quantity"


# --- free tier, base fee, sign-up month ----------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        (1, [(1, "0", "0")]),
        (3, [(3, "0", "0")]),
        (4, [(3, "0", "0"), (1, "300", "300")]),
        (12, [(3, "0", "0"), (7, "300", "2100"), (2, "250", "500")]),
    ],
)
def test_free_tier_keeps_its_zero_line(quantity: int, expected: list[tuple[int, str, str]]) -> None:
    lines = price_class("lte-m", STARTER.classes["lte-m"], quantity, "JPY")
    assert summary(lines) == expected
    assert lines[0].description == f"lte-m 1\u2013{min(quantity, 3)} \u00d7 0"


def test_base_fee_line_comes_first() -> None:
    plan = catalog(USD_TOML).plan("pro")
    priced = price_month(plan, {"lte-m": 3})
    assert [(ln.kind, ln.device_class) for ln in priced.lines] == [
        ("base_fee", None),
        ("usage", "lte-m"),
        ("usage", "lte-m"),
    ]
    assert summary(priced.lines) == [
        (1, "9.90", "9.90"),
        (2, "12.50", "25.00"),
        (1, "0.05", "0.05"),
    ]
    assert str(priced.subtotal) == "34.95"
    assert priced.currency == "USD"
    assert_exact(priced)


def test_base_fee_is_charged_without_devices() -> None:
    priced = price_month(catalog(USD_TOML).plan("pro"), {})
    assert summary(priced.lines) == [(1, "9.90", "9.90")]
    assert str(priced.subtotal) == "9.90"


def test_no_base_fee_line_when_fee_is_zero() -> None:
    assert all(line.kind != "base_fee" for line in price_month(STANDARD, {"lte-m": 1}).lines)


def test_signup_month_free_discounts_everything() -> None:
    priced = price_month(STARTER, {"lte-m": 12, "wifi": 5}, signup_month_free=True)
    *charged, discount = priced.lines
    assert sum(line.amount for line in charged) == Decimal(2600 + 400)
    assert discount.kind == "discount"
    assert discount.device_class is None
    assert (discount.quantity, str(discount.amount)) == (1, "-3000")
    assert str(priced.subtotal) == "0"
    assert_exact(priced)


def test_signup_month_free_with_base_fee() -> None:
    priced = price_month(catalog(USD_TOML).plan("pro"), {"wifi": 6}, signup_month_free=True)
    assert str(priced.lines[-1].amount) == "-15.90"
    assert str(priced.subtotal) == "0.00"
    assert_exact(priced)


def test_signup_month_free_with_nothing_to_discount_has_no_negative_zero() -> None:
    priced = price_month(STARTER, {"lte-m": 2}, signup_month_free=True)
    assert [str(line.amount) for line in priced.lines] == ["0", "0"]
    assert str(priced.subtotal) == "0"
    assert_exact(priced)


def test_signup_month_free_is_off_by_default() -> None:
    assert price_month(STARTER, {"lte-m": 12}).subtotal == Decimal(2600)


# --- classes ---------------------------------------------------------------------------------


def test_unknown_class_refused() -> None:
    with pytest.raises(InvalidError) as exc:
        price_month(STANDARD, {"lte-m": 1, "satellite": 2})
    assert exc.value.field == "device_class"
    assert "'satellite'" in exc.value.message
    assert "'standard'" in exc.value.message


def test_unknown_class_refused_even_at_zero() -> None:
    with pytest.raises(InvalidError):
        price_month(STANDARD, {"satellite": 0})


def test_classes_in_sorted_order() -> None:
    priced = price_month(STANDARD, {"wifi": 1, "lte-m": 1, "gateway": 1})
    assert [line.device_class for line in priced.lines] == ["gateway", "lte-m", "wifi"]
    assert str(priced.subtotal) == str(500 + 300 + 200)


# --- rounding and money formatting --------------------------------------------------------


def test_usd_fractional_unit_price_rounds_each_line_half_up() -> None:
    pricing = ClassPricing(mode="graduated", tiers=(Tier(up_to=None, price=Decimal("0.125")),))
    (line,) = price_class("lte-m", pricing, 3, "USD")
    assert (str(line.unit_price), str(line.amount)) == ("0.125", "0.38")
    assert line.description == "lte-m 1\u20133 \u00d7 0.125"


def test_subtotal_is_the_sum_of_rounded_lines() -> None:
    # 0.125 x 3 = 0.375 per class: two lines of 0.38 make 0.76, not round(0.75) = 0.75.
    pricing = ClassPricing(mode="volume", tiers=(Tier(up_to=None, price=Decimal("0.125")),))
    plan = Plan(
        name="fractional",
        currency="USD",
        base_fee=Decimal(0),
        free_signup_month=False,
        classes={"a": pricing, "b": pricing},
    )
    priced = price_month(plan, {"a": 3, "b": 3})
    assert [str(line.amount) for line in priced.lines] == ["0.38", "0.38"]
    assert str(priced.subtotal) == "0.76"


def test_catalog_refuses_sub_cent_prices() -> None:
    # Why line rounding rarely bites with a real catalog: prices are in whole minor units.
    with pytest.raises(CatalogError, match="more decimal places"):
        catalog(USD_TOML.replace('price = "0.05"', 'price = "0.125"'))


@pytest.mark.parametrize(
    ("amount", "currency", "rounding", "expected"),
    [
        ("0.375", "USD", "half_up", "0.38"),
        ("0.375", "USD", "half_even", "0.38"),
        ("0.385", "USD", "half_even", "0.38"),
        ("0.385", "USD", "half_up", "0.39"),
        ("0.389", "USD", "down", "0.38"),
        ("0.381", "USD", "up", "0.39"),
        ("-0.375", "USD", "half_up", "-0.38"),
        ("-0.389", "USD", "down", "-0.38"),
        ("12.5", "USD", "half_up", "12.50"),
        ("12", "USD", "half_up", "12.00"),
        ("349.5", "JPY", "half_up", "350"),
        ("349.5", "JPY", "down", "349"),
        ("0.0005", "KWD", "half_up", "0.001"),
        ("3.5E+3", "JPY", "half_up", "3500"),
        ("1E+1", "USD", "half_up", "10.00"),
        ("-0", "JPY", "half_up", "0"),
        ("-0.001", "USD", "half_up", "0.00"),
        ("-0.004", "JPY", "down", "0"),
    ],
)
def test_round_money(amount: str, currency: str, rounding: Rounding, expected: str) -> None:
    rounded = round_money(Decimal(amount), currency, rounding)
    assert type(rounded) is Decimal
    assert str(rounded) == expected


def test_round_money_defaults_to_half_up() -> None:
    assert str(round_money(Decimal("0.125"), "USD")) == "0.13"


@pytest.mark.parametrize(
    ("subtotal", "rate", "currency", "rounding", "expected"),
    [
        ("3500", "0.10", "JPY", "down", "350"),
        ("3509", "0.10", "JPY", "down", "350"),
        ("3333", "0.08", "JPY", "down", "266"),
        ("0", "0.10", "JPY", "down", "0"),
        ("10.05", "0.0825", "USD", "half_up", "0.83"),
        ("10.05", "0.0825", "USD", "down", "0.82"),
        ("34.95", "0", "USD", "down", "0.00"),
    ],
)
def test_tax_amount(
    subtotal: str, rate: str, currency: str, rounding: Rounding, expected: str
) -> None:
    tax = tax_amount(Decimal(subtotal), Decimal(rate), currency, rounding)
    assert type(tax) is Decimal
    assert str(tax) == expected


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("3500", "JPY", "3500"),
        ("3.5E+3", "JPY", "3500"),
        ("12.5", "USD", "12.50"),
        ("1E+1", "USD", "10.00"),
        ("-15.90", "USD", "-15.90"),
        ("-0", "JPY", "0"),
        ("-0.00", "USD", "0.00"),
        ("0.125", "USD", "0.125"),
        ("0.0000001", "USD", "0.0000001"),
    ],
)
def test_format_money(amount: str, currency: str, expected: str) -> None:
    assert format_money(Decimal(amount), currency) == expected


def test_float_refused() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        round_money(0.1, "USD")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Decimal"):
        tax_amount(Decimal(100), 0.1, "JPY", "down")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Decimal"):
        format_money(3500.0, "JPY")  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_refused(amount: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        round_money(Decimal(amount), "JPY")


def test_unknown_currency_refused() -> None:
    with pytest.raises(ValueError, match="XXX"):
        round_money(Decimal(1), "XXX")


# --- properties ------------------------------------------------------------------------------


@st.composite
def tier_tables(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(draw(st.lists(st.integers(1, 150), max_size=4, unique=True)))
    # Prices in cents, with free tiers common enough to matter.
    cents = st.integers(0, 100_000) | st.just(0)
    prices = [Decimal(draw(cents)).scaleb(-2) for _ in range(len(bounds) + 1)]
    return tuple(Tier(up_to=b, price=p) for b, p in zip([*bounds, None], prices, strict=True))


def unit_price(tiers: tuple[Tier, ...], unit: int) -> Decimal:
    return next(t.price for t in tiers if t.up_to is None or unit <= t.up_to)


def pricing_of(mode: Mode, tiers: tuple[Tier, ...]) -> ClassPricing:
    return ClassPricing(mode=mode, tiers=tiers)


@given(tiers=tier_tables(), quantity=st.integers(0, 400))
def test_graduated_total_is_sum_of_each_units_tier_price(
    tiers: tuple[Tier, ...], quantity: int
) -> None:
    lines = price_class("c", pricing_of("graduated", tiers), quantity, "USD")
    expected = sum((unit_price(tiers, u) for u in range(1, quantity + 1)), Decimal(0))
    assert sum((line.amount for line in lines), Decimal(0)) == expected
    assert sum(line.quantity for line in lines) == quantity
    # Lines are contiguous runs of units, one per tier used, in tier order.
    assert [line.tier for line in lines] == list(range(1, len(lines) + 1))
    assert all(line.quantity > 0 for line in lines)


@given(tiers=tier_tables(), quantity=st.integers(1, 400))
def test_volume_total_is_quantity_times_the_tier_it_reaches(
    tiers: tuple[Tier, ...], quantity: int
) -> None:
    (line,) = price_class("c", pricing_of("volume", tiers), quantity, "USD")
    assert line.quantity == quantity
    assert line.amount == quantity * unit_price(tiers, quantity)
    assert line.tier_from is not None
    assert line.tier_from <= quantity
    assert line.tier_to is None or quantity <= line.tier_to


@given(
    tiers=tier_tables(),
    mode=st.sampled_from(["graduated", "volume"]),
    peaks=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 300)),
    free=st.booleans(),
)
def test_month_amounts_are_plain_and_add_up(
    tiers: tuple[Tier, ...], mode: Mode, peaks: dict[str, int], free: bool
) -> None:
    pricing = pricing_of(mode, tiers)
    plan = Plan(
        name="p",
        currency="USD",
        base_fee=Decimal("4.99"),
        free_signup_month=free,
        classes={"a": pricing, "b": pricing, "c": pricing},
    )
    priced = price_month(plan, peaks, signup_month_free=free)
    assert_exact(priced)
    assert priced.subtotal == sum((line.amount for line in priced.lines), Decimal(0))
    for amount in [priced.subtotal, *(line.amount for line in priced.lines)]:
        assert amount.as_tuple().exponent == -2
    if free:
        assert priced.subtotal == 0


FLAT = (
    Tier(up_to=10, price=Decimal(300), flat=Decimal(1000)),
    Tier(up_to=100, price=Decimal(250), flat=Decimal(5000)),
    Tier(up_to=None, price=Decimal(200)),
)


@pytest.mark.parametrize(
    ("mode", "quantity", "expected"),
    [
        # Graduated: every tier reached adds its flat amount once, beside its units.
        ("graduated", 1, [(1, "300", "300"), (1, "1000", "1000")]),
        ("graduated", 10, [(10, "300", "3000"), (1, "1000", "1000")]),
        (
            "graduated",
            11,
            [(10, "300", "3000"), (1, "1000", "1000"), (1, "250", "250"), (1, "5000", "5000")],
        ),
        (
            "graduated",
            101,
            [
                (10, "300", "3000"),
                (1, "1000", "1000"),
                (90, "250", "22500"),
                (1, "5000", "5000"),
                (1, "200", "200"),
            ],
        ),
        # Volume: only the tier the total reaches, its flat amount once.
        ("volume", 10, [(10, "300", "3000"), (1, "1000", "1000")]),
        ("volume", 11, [(11, "250", "2750"), (1, "5000", "5000")]),
        ("volume", 101, [(101, "200", "20200")]),
        ("volume", 0, []),
    ],
)
def test_tier_flat_amounts(mode: Mode, quantity: int, expected: list[tuple[int, str, str]]) -> None:
    lines = price_class("lte-m", ClassPricing(mode=mode, tiers=FLAT), quantity, "JPY")
    assert [(x.quantity, str(x.unit_price), str(x.amount)) for x in lines] == expected
    assert all(x.kind == "usage" for x in lines)
    flats = [x for x in lines if "flat amount" in x.description]
    assert all(x.tier is not None and x.quantity == 1 for x in flats)


def test_catalog_reads_a_tier_flat_amount() -> None:
    text = """\
[plans.flat]
currency = "USD"
[plans.flat.classes.wifi]
mode = "graduated"
tiers = [ { up_to = 5, price = "1.50", flat = "10.00" }, { price = "1.00" } ]
[tax.US]
rates = [ { from = "2000-01-01", rate = "0", rounding = "half_up" } ]
"""
    tiers = parse_catalog(tomllib.loads(text), source="test").plan("flat").classes["wifi"].tiers
    assert [(t.price, t.flat) for t in tiers] == [
        (Decimal("1.50"), Decimal("10.00")),
        (Decimal("1.00"), Decimal(0)),
    ]
    for bad in ('"-1"', '"1.005"', "1.5"):
        with pytest.raises(CatalogError, match="flat"):
            parse_catalog(
                tomllib.loads(text.replace('flat = "10.00"', f"flat = {bad}")), source="test"
            )


# --- overage above committed devices (issue 12) ---------------------------------------------

FLAT_ENTERED = ClassPricing(
    mode="graduated",
    tiers=(
        Tier(10, Decimal(300)),
        Tier(100, Decimal(250), Decimal(1000)),
        Tier(None, Decimal(200)),
    ),
)


@pytest.mark.parametrize(
    ("pricing", "quantity", "committed", "expected"),
    [
        # The worked example's 12 devices with 10 committed: units 11-12 at 250.
        (LTE_M, 12, 10, [(2, "250", "500")]),
        (LTE_M, 10, 10, []),  # exactly the commitment: no overage
        (LTE_M, 3, 10, []),  # below it: nothing back either
        (LTE_M, 12, 5, [(5, "300", "1500"), (2, "250", "500")]),  # from commitment + 1
        (LTE_M, 105, 100, [(5, "200", "1000")]),
        (LTE_M, 12, 0, [(10, "300", "3000"), (2, "250", "500")]),  # nothing committed: all
        # Volume: the units above at the tier the whole quantity reaches.
        (LTE_M_VOLUME, 12, 5, [(7, "250", "1750")]),
        (LTE_M_VOLUME, 12, 11, [(1, "250", "250")]),
        # A tier's flat amount goes with the overage that enters the tier, not with one that
        # only continues it (the commitment paid for reaching it).
        (FLAT_ENTERED, 12, 10, [(2, "250", "500"), (1, "1000", "1000")]),
        (FLAT_ENTERED, 12, 11, [(1, "250", "250")]),
    ],
)
def test_price_overage(
    pricing: ClassPricing, quantity: int, committed: int, expected: list[tuple[int, str, str]]
) -> None:
    lines = price_overage("lte-m", pricing, quantity, committed, "JPY")
    assert summary(lines) == expected
    assert {line.kind for line in lines} <= {"overage"}


@given(tiers=tier_tables(), quantity=st.integers(0, 300), committed=st.integers(0, 300))
def test_graduated_overage_is_what_the_units_above_the_commitment_cost(
    tiers: tuple[Tier, ...], quantity: int, committed: int
) -> None:
    lines = price_overage("c", pricing_of("graduated", tiers), quantity, committed, "USD")
    expected = sum((unit_price(tiers, u) for u in range(committed + 1, quantity + 1)), Decimal(0))
    assert sum((line.amount for line in lines), Decimal(0)) == expected
    assert sum(line.quantity for line in lines) == max(0, quantity - committed)


def test_a_contract_month_has_no_base_fee_and_bills_above_the_commitment() -> None:
    plan = catalog(USD_TOML).plan("pro")
    priced = price_month(plan, {"lte-m": 5, "wifi": 3}, commitments={"lte-m": 3})
    # No base fee (the contract's term fee holds it); lte-m 4-5 above 3; wifi as usage.
    assert [(ln.kind, ln.device_class, ln.quantity) for ln in priced.lines] == [
        ("overage", "lte-m", 2),
        ("usage", "wifi", 3),
    ]
    assert priced.subtotal == Decimal("0.10") + Decimal("3.75")
    assert_exact(priced)
