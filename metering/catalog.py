"""Plan catalog and tax tables (SPEC P1-P3), loaded from TOML and validated up front.

Pure: no database, settings or clock. The catalog is read once at start-up and every
mistake in it is refused there, with the file and dotted key, rather than surfacing as
a wrong invoice at month close. That is why unknown keys are errors (a typo such as
`up_too` must not silently make a tier open-ended) and why money must be written as
decimal strings: a TOML float like 0.1 is already inexact when the parser hands it over.
TOML integers are exact, so they are accepted for prices and base fees; tax rates are
fractions and must be strings.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = [
    "CURRENCY_MINOR_UNITS",
    "DEFAULT_CATALOG_PATH",
    "Catalog",
    "CatalogError",
    "ClassPricing",
    "ContractPolicy",
    "Metric",
    "Mode",
    "Plan",
    "Rounding",
    "TaxRate",
    "TaxRateNotFoundError",
    "TaxTable",
    "Tier",
    "UnknownPlanError",
    "UnknownTaxCountryError",
    "distinct_classes",
    "load_catalog",
    "parse_catalog",
]

Mode = Literal["graduated", "volume"]
#: How a class's monthly quantity is counted (SPEC M2, M6).
Metric = Literal["peak", "distinct"]
Rounding = Literal["down", "up", "half_up", "half_even"]
#: Issue 12: seed 003's calendar terms or seed 004's anniversary terms.
ContractPolicy = Literal["calendar", "anniversary"]

DEFAULT_CATALOG_PATH: Final[Path] = Path(__file__).with_name("default_catalog.toml")

# ISO 4217 minor units for the currencies we are prepared to bill in. A currency not
# listed here is refused rather than guessed, since the exponent decides rounding.
CURRENCY_MINOR_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        # No minor unit.
        "JPY": 0,
        "KRW": 0,
        "VND": 0,
        "CLP": 0,
        "ISK": 0,
        # Two decimal places.
        "USD": 2,
        "EUR": 2,
        "GBP": 2,
        "CNY": 2,
        "TWD": 2,
        "SGD": 2,
        "AUD": 2,
        "NZD": 2,
        "CAD": 2,
        "CHF": 2,
        "HKD": 2,
        "THB": 2,
        "INR": 2,
        "IDR": 2,
        "MYR": 2,
        "PHP": 2,
        "SEK": 2,
        "NOK": 2,
        "DKK": 2,
        "PLN": 2,
        "CZK": 2,
        "MXN": 2,
        "BRL": 2,
        "ZAR": 2,
        "AED": 2,
        "SAR": 2,
        "ILS": 2,
        # Three decimal places.
        "KWD": 3,
        "BHD": 3,
        "OMR": 3,
        "JOD": 3,
        "TND": 3,
    }
)

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_COUNTRY_RE: Final = re.compile(r"[A-Z]{2}")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
# Plain notation only: Decimal() would also take "1e3", " 5", "1_000", "NaN" and
# "Infinity", none of which belongs in a price list.
_DECIMAL_RE: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_ISO_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

_MODES: Final[Mapping[str, Mode]] = {"graduated": "graduated", "volume": "volume"}
_METRICS: Final[Mapping[str, Metric]] = {"peak": "peak", "distinct": "distinct"}
_ROUNDINGS: Final[Mapping[str, Rounding]] = {
    "down": "down",
    "up": "up",
    "half_up": "half_up",
    "half_even": "half_even",
}

_TOP_KEYS: Final = frozenset({"plans", "tax"})
_PLAN_KEYS: Final = frozenset(
    {
        "currency",
        "base_fee",
        "free_signup_month",
        "payment_method_required",
        "classes",
        "contract_policy",
        "annual_price",
        "contract_required",
    }
)
#: Issue 12: how a plan's contracts run (metering/periods.py has both rules).
_CONTRACT_POLICIES: Final[Mapping[str, ContractPolicy]] = {
    "calendar": "calendar",
    "anniversary": "anniversary",
}
_CLASS_KEYS: Final = frozenset({"mode", "tiers", "metric"})
_TIER_KEYS: Final = frozenset({"up_to", "price", "flat"})
_TAX_KEYS: Final = frozenset({"rates"})
_RATE_KEYS: Final = frozenset({"from", "rate", "rounding"})


class CatalogError(ValueError):
    """A catalog that cannot be trusted to bill with; the message is one log line."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = " ".join(reason.split())
        super().__init__(f"{file}: {key}: {self.reason}")


class UnknownPlanError(KeyError):
    """KeyError so `catalog.plan(x)` reads like a mapping lookup; str() is not quoted."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown plan {name!r}; known plans: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownTaxCountryError(KeyError):
    """An account country with no tax table cannot be billed, so it is refused."""

    def __init__(self, country: str, known: tuple[str, ...]) -> None:
        self.country = country
        self.known = known
        super().__init__(
            f"no tax table for country {country!r}; known: {', '.join(known) or '(none)'}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class TaxRateNotFoundError(LookupError):
    """The day falls before the country's first rate; guessing 0 % would undercharge."""

    def __init__(self, country: str, day: date) -> None:
        self.country = country
        self.day = day
        super().__init__(f"no tax rate for {country} in force on {day.isoformat()}")


@dataclass(frozen=True, slots=True)
class Tier:
    """`up_to` is the last unit (inclusive) the tier covers; None is the final open tier."""

    up_to: int | None
    price: Decimal
    #: Charged once when the quantity reaches this tier, beside its unit price (Stripe's
    #: `flat_amount`): in graduated mode for every tier reached, in volume mode for the one.
    flat: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class ClassPricing:
    mode: Mode
    tiers: tuple[Tier, ...]
    #: "peak" bills the month's maximum of concurrently Active devices (M2); "distinct" bills
    #: every device Active at any instant of the month, once (M6).
    metric: Metric = "peak"


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    currency: str
    base_fee: Decimal
    free_signup_month: bool
    classes: Mapping[str, ClassPricing]
    #: A2: devices can be registered only once the account has a payment method on file.
    payment_method_required: bool = False
    #: Issue 12: the contract rules of the plan; None: the plan offers no contract.
    contract_policy: ContractPolicy | None = None
    #: The fee of an annual term (a monthly term's is ``base_fee``); None: monthly terms only.
    annual_price: Decimal | None = None
    #: Devices can be registered only while the account has a contract in force.
    contract_required: bool = False


def distinct_classes(plan: Plan | None) -> frozenset[str]:
    """The plan's classes counted as distinct devices (M6); none for no plan.

    What the peak paths take as ``distinct``. ``None`` is accepted so that an account whose
    plan the catalog lacks still gets its peaks computed; pricing then refuses it by name.
    """
    if plan is None:
        return frozenset()
    return frozenset(c for c, p in plan.classes.items() if p.metric == "distinct")


@dataclass(frozen=True, slots=True)
class TaxRate:
    effective_from: date
    rate: Decimal
    rounding: Rounding


@dataclass(frozen=True, slots=True)
class TaxTable:
    country: str
    rates: tuple[TaxRate, ...]  # sorted by effective_from, no two on the same day

    def rate_on(self, day: date) -> TaxRate:
        """The rate in force on `day`; callers pass the period's first day (SPEC P3)."""
        for rate in reversed(self.rates):
            if rate.effective_from <= day:
                return rate
        raise TaxRateNotFoundError(self.country, day)


@dataclass(frozen=True, slots=True)
class Catalog:
    source: str
    plans: Mapping[str, Plan]
    tax: Mapping[str, TaxTable]

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise UnknownPlanError(name, tuple(sorted(self.plans))) from None

    def tax_table(self, country: str) -> TaxTable:
        try:
            return self.tax[country]
        except KeyError:
            raise UnknownTaxCountryError(country, tuple(sorted(self.tax))) from None


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read and validate a catalog file; None means the catalog shipped with the package."""
    file = Path(path) if path is not None else DEFAULT_CATALOG_PATH
    source = str(file)
    try:
        with file.open("rb") as fp:
            data = tomllib.load(fp)
    except FileNotFoundError:
        raise CatalogError(source, "<file>", "file not found") from None
    except OSError as exc:
        raise CatalogError(source, "<file>", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(source, "<file>", f"not valid UTF-8: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(source, "<toml>", f"invalid TOML: {exc}") from None
    return parse_catalog(data, source)


def parse_catalog(data: Mapping[str, Any], source: str) -> Catalog:
    """Validate already-parsed TOML; `source` only names the file in error messages."""
    return _Parser(source).catalog(data)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> CatalogError:
        return CatalogError(self.source, key, reason)

    # --- structure -------------------------------------------------------------

    def table(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a table, got {_kind(value)}")
        return value

    def only_keys(self, table: Mapping[str, Any], key: str, allowed: frozenset[str]) -> None:
        unknown = sorted(k for k in table if k not in allowed)
        if unknown:
            expected = ", ".join(sorted(allowed))
            raise self.fail(_join(key, unknown[0]), f"unknown key (expected one of: {expected})")

    def required(self, table: Mapping[str, Any], key: str, name: str) -> Any:
        if name not in table:
            raise self.fail(_join(key, name), "missing required key")
        return table[name]

    # --- catalog ---------------------------------------------------------------

    def catalog(self, data: Mapping[str, Any]) -> Catalog:
        self.only_keys(data, "", _TOP_KEYS)
        if "plans" not in data:
            raise self.fail("plans", "no [plans] table; a catalog needs at least one plan")
        raw_plans = self.table(data["plans"], "plans")
        if not raw_plans:
            raise self.fail("plans", "no plans defined; a catalog needs at least one plan")
        plans = {
            name: self.plan(name, raw, _join("plans", name)) for name, raw in raw_plans.items()
        }
        raw_tax = self.table(data.get("tax", {}), "tax")
        tax = {
            country: self.tax_table(country, raw, _join("tax", country))
            for country, raw in raw_tax.items()
        }
        return Catalog(source=self.source, plans=MappingProxyType(plans), tax=MappingProxyType(tax))

    def plan(self, name: str, raw: object, key: str) -> Plan:
        if not _NAME_RE.fullmatch(name):
            raise self.fail(key, f"plan name must match {_NAME_RE.pattern}")
        table = self.table(raw, key)
        self.only_keys(table, key, _PLAN_KEYS)

        currency = self.required(table, key, "currency")
        if not isinstance(currency, str) or currency not in CURRENCY_MINOR_UNITS:
            raise self.fail(
                _join(key, "currency"),
                f"unknown currency {currency!r} (known: {', '.join(sorted(CURRENCY_MINOR_UNITS))})",
            )
        minor_units = CURRENCY_MINOR_UNITS[currency]

        base_fee = self.money(table.get("base_fee", "0"), _join(key, "base_fee"), minor_units)

        free_signup_month = table.get("free_signup_month", False)
        if not isinstance(free_signup_month, bool):
            raise self.fail(
                _join(key, "free_signup_month"),
                f"must be true or false, got {_kind(free_signup_month)}",
            )

        payment_method_required = table.get("payment_method_required", False)
        if not isinstance(payment_method_required, bool):
            raise self.fail(
                _join(key, "payment_method_required"),
                f"must be true or false, got {_kind(payment_method_required)}",
            )

        contract_policy, annual_price, contract_required = self.contract_terms(
            table, key, minor_units
        )

        classes_key = _join(key, "classes")
        raw_classes = self.table(table.get("classes", {}), classes_key)
        if not raw_classes:
            raise self.fail(classes_key, "plan has no device classes")
        classes = {
            cls: self.class_pricing(cls, raw_cls, _join(classes_key, cls), minor_units)
            for cls, raw_cls in raw_classes.items()
        }
        return Plan(
            name=name,
            currency=currency,
            base_fee=base_fee,
            free_signup_month=free_signup_month,
            classes=MappingProxyType(classes),
            payment_method_required=payment_method_required,
            contract_policy=contract_policy,
            annual_price=annual_price,
            contract_required=contract_required,
        )

    def contract_terms(
        self, table: Mapping[str, Any], key: str, minor_units: int
    ) -> tuple[ContractPolicy | None, Decimal | None, bool]:
        """The plan's contract keys. An annual price or a required contract without a policy
        would be a plan that bills a contract nobody can start: refused."""
        raw_policy = table.get("contract_policy")
        policy = None
        if raw_policy is not None:
            policy = _CONTRACT_POLICIES.get(raw_policy) if isinstance(raw_policy, str) else None
            if policy is None:
                raise self.fail(
                    _join(key, "contract_policy"),
                    f"unknown contract policy {raw_policy!r} "
                    f"(expected one of: {', '.join(_CONTRACT_POLICIES)})",
                )
        annual_price = None
        if "annual_price" in table:
            annual_price = self.money(
                table["annual_price"], _join(key, "annual_price"), minor_units
            )
        required = table.get("contract_required", False)
        if not isinstance(required, bool):
            raise self.fail(
                _join(key, "contract_required"), f"must be true or false, got {_kind(required)}"
            )
        if policy is None:
            for name, present in (
                ("annual_price", annual_price is not None),
                ("contract_required", required),
            ):
                if present:
                    raise self.fail(
                        _join(key, name),
                        "needs contract_policy (calendar or anniversary): contracts of this "
                        "plan would have no rules",
                    )
        return policy, annual_price, required

    def class_pricing(self, name: str, raw: object, key: str, minor_units: int) -> ClassPricing:
        if not _NAME_RE.fullmatch(name):
            raise self.fail(key, f"device class name must match {_NAME_RE.pattern}")
        table = self.table(raw, key)
        self.only_keys(table, key, _CLASS_KEYS)

        raw_mode = self.required(table, key, "mode")
        mode = _MODES.get(raw_mode) if isinstance(raw_mode, str) else None
        if mode is None:
            raise self.fail(
                _join(key, "mode"),
                f"unknown mode {raw_mode!r} (expected one of: {', '.join(_MODES)})",
            )

        tiers_key = _join(key, "tiers")
        raw_tiers = self.required(table, key, "tiers")
        if not isinstance(raw_tiers, list):
            raise self.fail(tiers_key, f"must be an array of tables, got {_kind(raw_tiers)}")
        if not raw_tiers:
            raise self.fail(tiers_key, "no tiers; at least one (open) tier is required")
        tiers = tuple(
            self.tier(raw_tier, f"{tiers_key}[{i}]", minor_units)
            for i, raw_tier in enumerate(raw_tiers)
        )
        self.check_tier_order(tiers, tiers_key)

        raw_metric = table.get("metric", "peak")
        metric = _METRICS.get(raw_metric) if isinstance(raw_metric, str) else None
        if metric is None:
            raise self.fail(
                _join(key, "metric"),
                f"unknown metric {raw_metric!r} (expected one of: {', '.join(_METRICS)})",
            )
        return ClassPricing(mode=mode, tiers=tiers, metric=metric)

    def tier(self, raw: object, key: str, minor_units: int) -> Tier:
        table = self.table(raw, key)
        self.only_keys(table, key, _TIER_KEYS)
        up_to = table.get("up_to")
        # bool is an int subclass, and `up_to = true` is a typo, not a tier of 1.
        if up_to is not None and (
            not isinstance(up_to, int) or isinstance(up_to, bool) or up_to <= 0
        ):
            raise self.fail(_join(key, "up_to"), f"must be a positive integer, got {up_to!r}")
        price = self.money(self.required(table, key, "price"), _join(key, "price"), minor_units)
        flat = (
            self.money(table["flat"], _join(key, "flat"), minor_units)
            if "flat" in table
            else Decimal(0)
        )
        return Tier(up_to=up_to, price=price, flat=flat)

    def check_tier_order(self, tiers: tuple[Tier, ...], key: str) -> None:
        last = len(tiers) - 1
        previous: int | None = None
        for i, tier in enumerate(tiers):
            if tier.up_to is None:
                if i != last:
                    raise self.fail(f"{key}[{i}]", "open tier (no up_to) must be the last tier")
                continue
            if previous is not None and tier.up_to <= previous:
                raise self.fail(
                    f"{key}[{i}].up_to",
                    f"up_to must be strictly increasing ({tier.up_to} after {previous})",
                )
            previous = tier.up_to
        if tiers[last].up_to is not None:
            raise self.fail(
                f"{key}[{last}]",
                "missing final open tier: the last tier must have no up_to",
            )

    # --- tax -------------------------------------------------------------------

    def tax_table(self, country: str, raw: object, key: str) -> TaxTable:
        if not _COUNTRY_RE.fullmatch(country):
            raise self.fail(key, "country must be two uppercase letters (ISO 3166-1 alpha-2)")
        table = self.table(raw, key)
        self.only_keys(table, key, _TAX_KEYS)
        rates_key = _join(key, "rates")
        raw_rates = self.required(table, key, "rates")
        if not isinstance(raw_rates, list):
            raise self.fail(rates_key, f"must be an array of tables, got {_kind(raw_rates)}")
        if not raw_rates:
            raise self.fail(rates_key, "no rates defined")
        rates = [self.tax_rate(r, f"{rates_key}[{i}]") for i, r in enumerate(raw_rates)]
        seen: dict[date, int] = {}
        for i, rate in enumerate(rates):
            if rate.effective_from in seen:
                raise self.fail(
                    f"{rates_key}[{i}].from",
                    f"duplicate date {rate.effective_from.isoformat()} "
                    f"(also in {rates_key}[{seen[rate.effective_from]}])",
                )
            seen[rate.effective_from] = i
        rates.sort(key=lambda r: r.effective_from)
        return TaxTable(country=country, rates=tuple(rates))

    def tax_rate(self, raw: object, key: str) -> TaxRate:
        table = self.table(raw, key)
        self.only_keys(table, key, _RATE_KEYS)
        effective_from = self.iso_date(self.required(table, key, "from"), _join(key, "from"))

        rate_key = _join(key, "rate")
        raw_rate = self.required(table, key, "rate")
        if not isinstance(raw_rate, str):
            raise self.fail(
                rate_key, f'must be a decimal string such as "0.10", got {_kind(raw_rate)}'
            )
        rate = self.decimal(raw_rate, rate_key)
        if rate >= 1:
            raise self.fail(rate_key, f"rate must be in [0, 1), got {raw_rate!r}")

        raw_rounding = self.required(table, key, "rounding")
        rounding = _ROUNDINGS.get(raw_rounding) if isinstance(raw_rounding, str) else None
        if rounding is None:
            raise self.fail(
                _join(key, "rounding"),
                f"unknown rounding {raw_rounding!r} (expected one of: {', '.join(_ROUNDINGS)})",
            )
        return TaxRate(effective_from=effective_from, rate=rate, rounding=rounding)

    # --- scalars ---------------------------------------------------------------

    def money(self, raw: object, key: str, minor_units: int) -> Decimal:
        """A non-negative amount with no more decimal places than the currency has."""
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise self.fail(
                key,
                f'must be a decimal string such as "300" (floats are inexact), got {_kind(raw)}',
            )
        value = self.decimal(str(raw), key)
        exponent = value.as_tuple().exponent  # an int: decimal() admits only finite values
        if isinstance(exponent, int) and -exponent > minor_units:
            raise self.fail(
                key,
                f"{raw!r} has more decimal places than the currency allows ({minor_units})",
            )
        return value

    def decimal(self, raw: str, key: str) -> Decimal:
        if not _DECIMAL_RE.fullmatch(raw):
            raise self.fail(key, f'{raw!r} is not a decimal number (write e.g. "300" or "0.10")')
        value = Decimal(raw)
        if value.is_signed():
            raise self.fail(key, f"{raw!r} is negative")
        return value

    def iso_date(self, raw: object, key: str) -> date:
        # datetime is a date subclass; a TOML date-time here is a mistake, not a date.
        if isinstance(raw, datetime):
            raise self.fail(key, "must be a date (YYYY-MM-DD), not a date-time")
        if isinstance(raw, date):
            return raw
        if isinstance(raw, str) and _ISO_DATE_RE.fullmatch(raw):
            try:
                return date.fromisoformat(raw)
            except ValueError as exc:
                raise self.fail(key, f"invalid date {raw!r}: {exc}") from None
        raise self.fail(key, f"must be an ISO date (YYYY-MM-DD), got {raw!r}")


def _join(parent: str, name: str) -> str:
    """Dotted TOML key, quoting parts that are not bare keys so the path stays readable."""
    part = name if _BARE_KEY_RE.fullmatch(name) else _quote(name)
    return f"{parent}.{part}" if parent else part


def _quote(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _kind(value: object) -> str:
    """TOML's name for the value's type, which is what the catalog author wrote."""
    match value:
        case bool():
            return f"boolean {str(value).lower()}"
        case int():
            return f"integer {value}"
        case float():
            return f"float {value!r}"
        case str():
            return f"string {value!r}"
        case datetime() | date():
            return f"date {value.isoformat()}"
        case list():
            return "array"
        case Mapping():
            return "table"
        case _:
            return type(value).__name__
