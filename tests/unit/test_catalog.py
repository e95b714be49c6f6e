"""Catalog loading: the shipped catalog, and every refusal with the key and reason it names."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from metering.catalog import (
    CURRENCY_MINOR_UNITS,
    DEFAULT_CATALOG_PATH,
    Catalog,
    CatalogError,
    TaxRateNotFoundError,
    Tier,
    distinct_classes,
    load_catalog,
    parse_catalog,
)

PLAN = """\
[plans.p]
currency = "JPY"
base_fee = "0"
free_signup_month = false
"""
CLASS = """\
[plans.p.classes.c]
mode = "graduated"
tiers = [ { up_to = 10, price = "300" }, { up_to = 100, price = "250" }, { price = "200" } ]
"""
TAX = """\
[tax.JP]
rates = [ { from = "2019-10-01", rate = "0.10", rounding = "down" } ]
"""
VALID = PLAN + CLASS + TAX

TIERS = (
    'tiers = [ { up_to = 10, price = "300" }, { up_to = 100, price = "250" }, { price = "200" } ]'
)
RATES = 'rates = [ { from = "2019-10-01", rate = "0.10", rounding = "down" } ]'
T = "plans.p.classes.c.tiers"
R = "tax.JP.rates[0]"


def variant(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new)


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "catalog.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path: Path, text: str | bytes) -> CatalogError:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    err = info.value
    assert err.file == str(path)
    assert str(err) == f"{path}: {err.key}: {err.reason}"
    assert "\n" not in str(err)
    return err


# --- the shipped catalog --------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> Catalog:
    return load_catalog()


def test_default_catalog_is_the_shipped_file(default: Catalog) -> None:
    assert DEFAULT_CATALOG_PATH.is_file()
    assert default.source == str(DEFAULT_CATALOG_PATH)
    assert load_catalog(DEFAULT_CATALOG_PATH) == default
    assert sorted(default.plans) == [
        "business-anniversary", "business-calendar", "seats", "standard", "standard-volume",
        "starter",
    ]  # fmt: skip
    assert sorted(default.tax) == ["JP", "US"]
    # No shipped plan asks for a payment method or a contract: registration works out of the
    # box; a contract is for sale on the two business plans, one per policy (issue 12).
    assert not [p for p in default.plans.values() if p.payment_method_required]
    assert not [p for p in default.plans.values() if p.contract_required]
    assert {p.name: p.contract_policy for p in default.plans.values() if p.contract_policy} == {
        "business-anniversary": "anniversary",
        "business-calendar": "calendar",
    }


def test_default_standard_lte_m_is_graduated_300_250_200(default: Catalog) -> None:
    plan = default.plan("standard")
    assert (plan.name, plan.currency, plan.base_fee, plan.free_signup_month) == (
        "standard",
        "JPY",
        Decimal("0"),
        False,
    )
    lte_m = plan.classes["lte-m"]
    assert lte_m.mode == "graduated"
    assert lte_m.tiers == (
        Tier(10, Decimal("300")),
        Tier(100, Decimal("250")),
        Tier(None, Decimal("200")),
    )
    assert all(type(t.price) is Decimal for t in lte_m.tiers)


@pytest.mark.parametrize(
    ("cls", "tiers"),
    [
        ("lte-m", ((10, "300"), (100, "250"), (None, "200"))),
        ("wifi", ((10, "200"), (100, "150"), (None, "100"))),
        ("gateway", ((10, "500"), (None, "400"))),
    ],
)
def test_default_standard_volume_mirrors_standard(
    default: Catalog, cls: str, tiers: tuple[tuple[int | None, str], ...]
) -> None:
    expected = tuple(Tier(up_to, Decimal(price)) for up_to, price in tiers)
    assert default.plan("standard").classes[cls].mode == "graduated"
    assert default.plan("standard").classes[cls].tiers == expected
    assert default.plan("standard-volume").classes[cls].mode == "volume"
    assert default.plan("standard-volume").classes[cls].tiers == expected


def test_default_seats_is_standard_counted_as_distinct_devices(default: Catalog) -> None:
    seats, standard = default.plan("seats"), default.plan("standard")
    assert distinct_classes(seats) == {"lte-m", "wifi", "gateway"}
    for cls, pricing in seats.classes.items():
        assert pricing.metric == "distinct"
        assert (pricing.mode, pricing.tiers) == (
            standard.classes[cls].mode,
            standard.classes[cls].tiers,
        )


@pytest.mark.parametrize("name", ["standard", "standard-volume", "starter"])
def test_default_plans_other_than_seats_are_peak(default: Catalog, name: str) -> None:
    plan = default.plan(name)
    assert {p.metric for p in plan.classes.values()} == {"peak"}
    assert distinct_classes(plan) == frozenset()


def test_distinct_classes_of_a_missing_plan_is_empty() -> None:
    assert distinct_classes(None) == frozenset()


def test_default_starter_has_free_month_and_free_first_tier(default: Catalog) -> None:
    starter = default.plan("starter")
    assert starter.free_signup_month is True
    assert set(starter.classes) == {"lte-m", "wifi", "gateway"}
    for pricing in starter.classes.values():
        assert pricing.tiers[0].price == Decimal("0")
        assert pricing.tiers[-1].up_to is None
    assert starter.classes["lte-m"].tiers[:2] == (Tier(3, Decimal("0")), Tier(10, Decimal("300")))


@pytest.mark.parametrize(
    ("country", "day", "rate"),
    [
        ("JP", date(2014, 4, 1), "0.08"),
        ("JP", date(2019, 9, 30), "0.08"),
        ("JP", date(2019, 10, 1), "0.10"),
        ("JP", date(2030, 1, 1), "0.10"),
        ("US", date(2000, 1, 1), "0"),
        ("US", date(2026, 6, 1), "0"),
    ],
)
def test_default_tax_rate_on(default: Catalog, country: str, day: date, rate: str) -> None:
    found = default.tax_table(country).rate_on(day)
    assert found.rate == Decimal(rate)
    assert found.rounding == "down"


def test_rate_on_before_first_rate_is_a_lookup_error(default: Catalog) -> None:
    with pytest.raises(LookupError, match=r"no tax rate for JP in force on 2014-03-31") as info:
        default.tax["JP"].rate_on(date(2014, 3, 31))
    assert isinstance(info.value, TaxRateNotFoundError)


def test_unknown_plan_lists_known_plans(default: Catalog) -> None:
    with pytest.raises(KeyError) as info:
        default.plan("premium")
    assert str(info.value) == (
        "unknown plan 'premium'; known plans: business-anniversary, business-calendar, seats, "
        "standard, standard-volume, starter"
    )


def test_unknown_tax_country_lists_known(default: Catalog) -> None:
    with pytest.raises(KeyError, match=r"no tax table for country 'FR'; known: JP, US"):
        default.tax_table("FR")


def test_catalog_mappings_are_read_only(default: Catalog) -> None:
    with pytest.raises(TypeError):
        default.plans["x"] = default.plan("standard")  # type: ignore[index]
    with pytest.raises(TypeError):
        default.plan("standard").classes["x"] = default.plan("standard").classes["wifi"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("code", "minor_units"),
    [("JPY", 0), ("KRW", 0), ("USD", 2), ("EUR", 2), ("GBP", 2), ("CNY", 2), ("TWD", 2),
     ("SGD", 2), ("AUD", 2), ("CAD", 2), ("CHF", 2), ("HKD", 2), ("THB", 2), ("INR", 2),
     ("KWD", 3), ("BHD", 3)],
)  # fmt: skip
def test_currency_minor_units(code: str, minor_units: int) -> None:
    assert CURRENCY_MINOR_UNITS[code] == minor_units


# --- what a valid catalog may say -------------------------------------------------


def test_minimal_valid_catalog(tmp_path: Path) -> None:
    catalog = load_catalog(str(write(tmp_path, VALID)))
    assert catalog.plan("p").classes["c"].tiers[-1] == Tier(None, Decimal("200"))
    assert catalog.tax["JP"].rates[0].effective_from == date(2019, 10, 1)


def test_optional_keys_default_to_no_fee_and_no_free_month(tmp_path: Path) -> None:
    text = variant('base_fee = "0"\nfree_signup_month = false\n', "")
    plan = load_catalog(write(tmp_path, text)).plan("p")
    assert (plan.base_fee, plan.free_signup_month) == (Decimal("0"), False)
    assert plan.payment_method_required is False


def test_metric_defaults_to_peak(tmp_path: Path) -> None:
    plan = load_catalog(write(tmp_path, VALID)).plan("p")
    assert plan.classes["c"].metric == "peak"
    assert distinct_classes(plan) == frozenset()


def test_tax_table_is_optional(tmp_path: Path) -> None:
    assert load_catalog(write(tmp_path, PLAN + CLASS)).tax == {}


@pytest.mark.parametrize(
    ("old", "new", "get", "expected"),
    [
        pytest.param(
            '{ price = "200" }', "{ price = 200 }",
            lambda c: c.plan("p").classes["c"].tiers[2], Tier(None, Decimal("200")),
            id="int-price-is-exact",
        ),
        pytest.param(
            'base_fee = "0"', 'base_fee = "1500"',
            lambda c: c.plan("p").base_fee, Decimal("1500"), id="base-fee",
        ),
        pytest.param(
            'free_signup_month = false', "free_signup_month = true",
            lambda c: c.plan("p").free_signup_month, True, id="free-month",
        ),
        pytest.param(
            'free_signup_month = false',
            "free_signup_month = false\npayment_method_required = true",
            lambda c: c.plan("p").payment_method_required, True, id="payment-method-required",
        ),
        pytest.param(
            'from = "2019-10-01"', "from = 2019-10-01",
            lambda c: c.tax["JP"].rates[0].effective_from, date(2019, 10, 1), id="toml-date",
        ),
        pytest.param(
            'mode = "graduated"', 'mode = "volume"',
            lambda c: c.plan("p").classes["c"].mode, "volume", id="volume-mode",
        ),
        pytest.param(
            'mode = "graduated"', 'mode = "graduated"\nmetric = "distinct"',
            lambda c: c.plan("p").classes["c"].metric, "distinct", id="metric-distinct",
        ),
        pytest.param(
            'mode = "graduated"', 'mode = "graduated"\nmetric = "peak"',
            lambda c: c.plan("p").classes["c"].metric, "peak", id="metric-peak",
        ),
        pytest.param(
            'free_signup_month = false',
            'free_signup_month = false\ncontract_policy = "calendar"',
            lambda c: (c.plan("p").contract_policy, c.plan("p").annual_price,
                       c.plan("p").contract_required),
            ("calendar", None, False), id="contract-calendar",
        ),
        pytest.param(
            'free_signup_month = false',
            'free_signup_month = false\ncontract_policy = "anniversary"\n'
            'annual_price = "30000"\ncontract_required = true',
            lambda c: (c.plan("p").contract_policy, c.plan("p").annual_price,
                       c.plan("p").contract_required),
            ("anniversary", Decimal(30000), True), id="contract-anniversary",
        ),
        pytest.param(
            'free_signup_month = false', "free_signup_month = false",
            lambda c: (c.plan("p").contract_policy, c.plan("p").annual_price,
                       c.plan("p").contract_required),
            (None, None, False), id="no-contract",
        ),
        pytest.param(
            'rounding = "down"', 'rounding = "half_even"',
            lambda c: c.tax["JP"].rates[0].rounding, "half_even", id="rounding-half-even",
        ),
        pytest.param(
            'rate = "0.10"', 'rate = "0"',
            lambda c: c.tax["JP"].rates[0].rate, Decimal("0"), id="rate-zero",
        ),
    ],
)  # fmt: skip
def test_accepted_variants(
    tmp_path: Path, old: str, new: str, get: Callable[[Catalog], object], expected: object
) -> None:
    result = get(load_catalog(write(tmp_path, variant(old, new))))
    assert result == expected
    assert type(result) is type(expected)


def test_usd_cents_are_accepted(tmp_path: Path) -> None:
    text = variant('currency = "JPY"', 'currency = "USD"').replace('"300"', '"2.99"')
    plan = load_catalog(write(tmp_path, text)).plan("p")
    assert plan.classes["c"].tiers[0].price == Decimal("2.99")


def test_rates_are_sorted_by_date(tmp_path: Path) -> None:
    rates = (
        'rates = [ { from = "2019-10-01", rate = "0.10", rounding = "down" },'
        ' { from = "2014-04-01", rate = "0.08", rounding = "down" } ]'
    )
    table = load_catalog(write(tmp_path, variant(RATES, rates))).tax["JP"]
    assert [r.effective_from for r in table.rates] == [date(2014, 4, 1), date(2019, 10, 1)]
    assert table.rate_on(date(2015, 1, 1)).rate == Decimal("0.08")


def test_parse_catalog_names_the_given_source() -> None:
    with pytest.raises(CatalogError, match=r"^inline: plans: no \[plans\] table"):
        parse_catalog({}, "inline")


# --- refusals -------------------------------------------------------------------

BAD_CATALOGS = [
    # [plans]
    pytest.param(TAX, "plans", "no [plans] table", id="no-plans"),
    pytest.param("[plans]\n" + TAX, "plans", "no plans defined", id="empty-plans"),
    pytest.param('plans = "x"\n', "plans", "must be a table", id="plans-not-table"),
    pytest.param(
        variant("[plans.p", "[plans.Standard"), "plans.Standard", "plan name must match",
        id="plan-name-uppercase",
    ),
    pytest.param(
        variant("[plans.p", '[plans."my plan"'), 'plans."my plan"', "plan name must match",
        id="plan-name-space",
    ),
    pytest.param(
        variant("[plans.p", "[plans." + "p" * 33), "plans." + "p" * 33,
        "plan name must match", id="plan-name-too-long",
    ),
    # plan keys
    pytest.param(
        variant('currency = "JPY"', 'currency = "XYZ"'), "plans.p.currency",
        "unknown currency 'XYZ'", id="unknown-currency",
    ),
    pytest.param(
        variant('currency = "JPY"', 'currency = "jpy"'), "plans.p.currency",
        "unknown currency 'jpy'", id="currency-lowercase",
    ),
    pytest.param(
        variant('currency = "JPY"', "currency = 392"), "plans.p.currency",
        "unknown currency 392", id="currency-not-string",
    ),
    pytest.param(
        variant('currency = "JPY"\n', ""), "plans.p.currency", "missing required key",
        id="currency-missing",
    ),
    pytest.param(
        variant("free_signup_month = false", 'free_signup_month = "false"'),
        "plans.p.free_signup_month", "must be true or false", id="free-month-string",
    ),
    pytest.param(
        variant("free_signup_month = false", "free_signup_month = 1"),
        "plans.p.free_signup_month", "must be true or false", id="free-month-int",
    ),
    pytest.param(
        variant("free_signup_month = false", 'payment_method_required = "yes"'),
        "plans.p.payment_method_required", "must be true or false",
        id="payment-method-required-string",
    ),
    pytest.param(PLAN + TAX, "plans.p.classes", "plan has no device classes", id="no-classes"),
    pytest.param(
        PLAN + "classes = {}\n", "plans.p.classes", "plan has no device classes",
        id="empty-classes",
    ),
    # base_fee
    pytest.param(
        variant('base_fee = "0"', "base_fee = 0.0"), "plans.p.base_fee", "floats are inexact",
        id="base-fee-float",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "-100"'), "plans.p.base_fee", "is negative",
        id="base-fee-negative",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0.5"'), "plans.p.base_fee",
        "more decimal places than the currency allows (0)", id="base-fee-over-precise",
    ),
    # device classes
    pytest.param(
        variant("classes.c]", "classes.LTE]"), "plans.p.classes.LTE",
        "device class name must match", id="class-name-uppercase",
    ),
    pytest.param(
        variant("classes.c]", "classes.-c]"), "plans.p.classes.-c",
        "device class name must match", id="class-name-leading-dash",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "flat"'), "plans.p.classes.c.mode",
        "unknown mode 'flat'", id="unknown-mode",
    ),
    pytest.param(
        variant('mode = "graduated"\n', ""), "plans.p.classes.c.mode", "missing required key",
        id="mode-missing",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "graduated"\nmetric = "unique"'),
        "plans.p.classes.c.metric", "unknown metric 'unique' (expected one of: peak, distinct)",
        id="unknown-metric",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "graduated"\nmetric = "Distinct"'),
        "plans.p.classes.c.metric", "unknown metric 'Distinct'", id="metric-capitalised",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "graduated"\nmetric = true'),
        "plans.p.classes.c.metric", "unknown metric True", id="metric-not-string",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "graduated"\nmetrics = "distinct"'),
        "plans.p.classes.c.metrics", "unknown key (expected one of: metric, mode, tiers)",
        id="metric-typo",
    ),
    pytest.param(
        variant(TIERS, "tiers = []"), T, "no tiers", id="tiers-empty",
    ),
    pytest.param(
        variant(TIERS, ""), T, "missing required key", id="tiers-missing",
    ),
    pytest.param(
        variant(TIERS, 'tiers = "300"'), T, "must be an array of tables", id="tiers-not-array",
    ),
    pytest.param(
        variant(TIERS, "tiers = [ 300 ]"), f"{T}[0]", "must be a table", id="tier-not-table",
    ),
    # up_to
    pytest.param(
        variant("up_to = 10,", "up_to = 0,"), f"{T}[0].up_to", "must be a positive integer",
        id="up-to-zero",
    ),
    pytest.param(
        variant("up_to = 10,", "up_to = -5,"), f"{T}[0].up_to", "must be a positive integer",
        id="up-to-negative",
    ),
    pytest.param(
        variant("up_to = 10,", "up_to = true,"), f"{T}[0].up_to", "must be a positive integer",
        id="up-to-bool",
    ),
    pytest.param(
        variant("up_to = 10,", "up_to = 10.0,"), f"{T}[0].up_to", "must be a positive integer",
        id="up-to-float",
    ),
    pytest.param(
        variant("up_to = 10,", 'up_to = "10",'), f"{T}[0].up_to", "must be a positive integer",
        id="up-to-string",
    ),
    pytest.param(
        variant("up_to = 100,", "up_to = 10,"), f"{T}[1].up_to",
        "up_to must be strictly increasing (10 after 10)", id="up-to-equal",
    ),
    pytest.param(
        variant("up_to = 100,", "up_to = 5,"), f"{T}[1].up_to",
        "up_to must be strictly increasing (5 after 10)", id="up-to-decreasing",
    ),
    pytest.param(
        variant('{ price = "200" }', '{ up_to = 1000, price = "200" }'), f"{T}[2]",
        "missing final open tier", id="no-open-tier",
    ),
    pytest.param(
        variant('{ up_to = 100, price = "250" }', '{ price = "250" }'), f"{T}[1]",
        "open tier (no up_to) must be the last tier", id="open-tier-not-last",
    ),
    # prices
    pytest.param(
        variant('price = "300"', "price = 300.5"), f"{T}[0].price", "floats are inexact",
        id="price-float",
    ),
    pytest.param(
        variant('price = "300"', "price = 300.0"), f"{T}[0].price", "floats are inexact",
        id="price-whole-float",
    ),
    pytest.param(
        variant('price = "300"', "price = true"), f"{T}[0].price", "got boolean true",
        id="price-bool",
    ),
    pytest.param(
        variant('price = "300"', "price = -300"), f"{T}[0].price", "is negative",
        id="price-negative-int",
    ),
    pytest.param(
        variant(', price = "300"', ""), f"{T}[0].price", "missing required key",
        id="price-missing",
    ),
    *(
        pytest.param(
            variant('price = "300"', f'price = "{bad}"'), f"{T}[0].price", reason,
            id=f"price-{bad or 'empty'}",
        )
        for bad, reason in [
            ("abc", "'abc' is not a decimal number"),
            ("NaN", "'NaN' is not a decimal number"),
            ("Infinity", "'Infinity' is not a decimal number"),
            ("-1", "'-1' is negative"),
            ("-0", "'-0' is negative"),
            ("1e3", "'1e3' is not a decimal number"),
            ("1_000", "'1_000' is not a decimal number"),
            (" 300", "' 300' is not a decimal number"),
            ("+300", "'+300' is not a decimal number"),
            ("300.", "'300.' is not a decimal number"),
            ("", "'' is not a decimal number"),
            ("300.5", "'300.5' has more decimal places than the currency allows (0)"),
            ("300.0", "'300.0' has more decimal places than the currency allows (0)"),
        ]
    ),
    pytest.param(
        variant('currency = "JPY"', 'currency = "USD"').replace('"300"', '"2.999"'),
        f"{T}[0].price", "'2.999' has more decimal places than the currency allows (2)",
        id="price-over-precise-usd",
    ),
    pytest.param(
        variant('currency = "JPY"', 'currency = "KWD"').replace('"300"', '"1.0005"'),
        f"{T}[0].price", "more decimal places than the currency allows (3)",
        id="price-over-precise-kwd",
    ),
    # unknown keys, at every level
    pytest.param('title = "x"\n' + VALID, "title", "unknown key", id="unknown-top-key"),
    pytest.param(
        variant('base_fee = "0"', 'base_fees = "0"'), "plans.p.base_fees", "unknown key",
        id="unknown-plan-key",
    ),
    pytest.param(
        variant('mode = "graduated"', 'mode = "graduated"\nmodes = "volume"'),
        "plans.p.classes.c.modes", "unknown key", id="unknown-class-key",
    ),
    pytest.param(
        variant("up_to = 10,", "up_too = 10,"), f"{T}[0].up_too", "unknown key",
        id="unknown-tier-key",
    ),
    pytest.param(
        variant(RATES, RATES + '\nrate = "0.10"'), "tax.JP.rate", "unknown key",
        id="unknown-tax-key",
    ),
    pytest.param(
        variant('rounding = "down"', 'rounding = "down", note = "x"'), f"{R}.note",
        "unknown key", id="unknown-rate-key",
    ),
    # tax tables
    pytest.param(
        variant("[tax.JP]", "[tax.jp]"), "tax.jp", "two uppercase letters", id="country-lower",
    ),
    pytest.param(
        variant("[tax.JP]", "[tax.JPN]"), "tax.JPN", "two uppercase letters", id="country-3",
    ),
    pytest.param(variant(RATES, "rates = []"), "tax.JP.rates", "no rates", id="rates-empty"),
    pytest.param(
        variant(RATES, ""), "tax.JP.rates", "missing required key", id="rates-missing",
    ),
    pytest.param(
        variant('from = "2019-10-01"', 'from = "2019-13-01"'), f"{R}.from",
        "invalid date '2019-13-01'", id="from-invalid-month",
    ),
    pytest.param(
        variant('from = "2019-10-01"', 'from = "2019/10/01"'), f"{R}.from",
        "must be an ISO date", id="from-slashes",
    ),
    pytest.param(
        variant('from = "2019-10-01"', 'from = "20191001"'), f"{R}.from",
        "must be an ISO date", id="from-basic-format",
    ),
    pytest.param(
        variant('from = "2019-10-01"', "from = 2019-10-01T00:00:00"), f"{R}.from",
        "not a date-time", id="from-datetime",
    ),
    pytest.param(
        variant('from = "2019-10-01", ', ""), f"{R}.from", "missing required key",
        id="from-missing",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_policy = "monthly"'),
        "plans.p.contract_policy", "unknown contract policy 'monthly'", id="policy-unknown",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_policy = true'),
        "plans.p.contract_policy", "unknown contract policy True", id="policy-not-a-string",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\nannual_price = "30000"'),
        "plans.p.annual_price", "needs contract_policy", id="annual-price-without-policy",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_required = true'),
        "plans.p.contract_required", "needs contract_policy", id="required-without-policy",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_policy = "calendar"\n'
                'annual_price = 3.5'),
        "plans.p.annual_price", "floats are inexact", id="annual-price-float",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_policy = "calendar"\n'
                'annual_price = "3.5"'),
        "plans.p.annual_price", "more decimal places", id="annual-price-fraction-of-yen",
    ),
    pytest.param(
        variant('base_fee = "0"', 'base_fee = "0"\ncontract_policy = "calendar"\n'
                'contract_required = "yes"'),
        "plans.p.contract_required", "must be true or false", id="required-not-bool",
    ),
    pytest.param(
        variant('rate = "0.10"', 'rate = "1"'), f"{R}.rate", "rate must be in [0, 1)",
        id="rate-one",
    ),
    pytest.param(
        variant('rate = "0.10"', 'rate = "1.5"'), f"{R}.rate", "rate must be in [0, 1)",
        id="rate-above-one",
    ),
    pytest.param(
        variant('rate = "0.10"', 'rate = "-0.1"'), f"{R}.rate", "is negative",
        id="rate-negative",
    ),
    pytest.param(
        variant('rate = "0.10"', "rate = 0.1"), f"{R}.rate", "must be a decimal string",
        id="rate-float",
    ),
    pytest.param(
        variant('rate = "0.10"', 'rate = "ten"'), f"{R}.rate", "is not a decimal number",
        id="rate-not-decimal",
    ),
    pytest.param(
        variant(', rounding = "down"', ""), f"{R}.rounding", "missing required key",
        id="rounding-missing",
    ),
    pytest.param(
        variant('rounding = "down"', 'rounding = "nearest"'), f"{R}.rounding",
        "unknown rounding 'nearest'", id="rounding-unknown",
    ),
    pytest.param(
        variant(
            RATES,
            'rates = [ { from = "2019-10-01", rate = "0.10", rounding = "down" },'
            " { from = 2019-10-01, rate = '0.08', rounding = 'down' } ]",
        ),
        "tax.JP.rates[1].from", "duplicate date 2019-10-01 (also in tax.JP.rates[0])",
        id="duplicate-from",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "reason"), BAD_CATALOGS)
def test_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = refusal(tmp_path, text)
    assert err.key == key
    assert reason in err.reason


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value) == f"{path}: <file>: file not found"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path)  # a directory
    assert (info.value.key, info.value.file) == ("<file>", str(tmp_path))
    assert info.value.reason.startswith("cannot read file")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("[plans.p\n", "invalid TOML: ", id="unclosed-header"),
        pytest.param("tiers = [1,\n", "invalid TOML: Invalid value", id="unclosed-array"),
        pytest.param('a = "x"\na = "y"\n', "invalid TOML: Cannot overwrite", id="dup-key"),
        pytest.param(b'a = "\xff"\n', "not valid UTF-8", id="not-utf8"),
    ],
)
def test_bad_toml(tmp_path: Path, text: str | bytes, reason: str) -> None:
    err = refusal(tmp_path, text)
    assert err.key in {"<toml>", "<file>"}
    assert err.reason.startswith(reason)


def test_catalog_error_is_a_value_error_with_parts() -> None:
    err = CatalogError("f.toml", "plans.p", "line one\nline two")
    assert isinstance(err, ValueError)
    assert (err.file, err.key, err.reason) == ("f.toml", "plans.p", "line one line two")
    assert str(err) == "f.toml: plans.p: line one line two"
