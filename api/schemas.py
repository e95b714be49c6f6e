"""Request and response bodies of the REST API (what /openapi.json documents)."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from ingest.processor import Reason

State = Literal["active", "inactive"]

# PostgreSQL text cannot hold NUL (U+0000). Free text that reaches the database unchecked
# carries this pattern, so a NUL is a 422 naming the field, not a 500 from the driver.
NO_NUL = r"^[^\x00]*$"


def _full_date(value: object) -> object:
    # The document promises a full-date string; left alone, pydantic would also take a Unix
    # timestamp (0 -> 1970-01-01) or a datetime string.
    if isinstance(value, date) or (
        isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value)
    ):
        return value
    raise ValueError("expected a date as YYYY-MM-DD")


InputDate = Annotated[date, BeforeValidator(_full_date)]


def _rfc3339(value: object) -> object:
    # As _full_date: left alone, pydantic would read a number ("0.5") as a Unix timestamp.
    if isinstance(value, datetime) or (
        isinstance(value, str)
        and re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}", value)
    ):
        return value
    raise ValueError("expected an RFC 3339 date-time with an offset, e.g. 2026-10-01T00:00:00Z")


InputInstant = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    device_class: str = Field(alias="class", min_length=1, max_length=64, examples=["lte-m"])
    id: str | None = Field(
        default=None, min_length=1, max_length=64, description="default: generated"
    )
    name: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    gateway_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=NO_NUL)


class DeviceOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    device_class: str = Field(alias="class")
    name: str | None
    gateway_id: str | None
    state: State
    state_at: datetime = Field(
        description="the time of the device's latest state event or in-order heartbeat, "
        "which may repeat its state (events are ordered by time: D3)"
    )
    state_since: datetime = Field(description="when the device entered its current state")
    registered_at: datetime
    last_seen_at: datetime | None
    key_prefix: str = Field(description="the first characters of the device key")


class MqttConnectionOut(BaseModel):
    url: str | None = Field(description="the broker; null when devmeter knows none")
    username: str = Field(description="the device's MQTT username: `<account>/<device id>`")
    password: str | None = Field(
        description="the device key (shown this once; null in an Idempotency-Key replay)"
    )
    client_id: str = Field(description="the client id to connect with (the username)")
    topic: str = Field(description="the one topic this device may publish its heartbeats on")


class DeviceCreated(DeviceOut):
    key: str | None = Field(
        description="the device key, shown this once: store it on the device. null in a "
        "replay of an Idempotency-Key (the key is stored only as a hash): rotate the key"
    )
    mqtt: MqttConnectionOut = Field(description="everything the device needs to connect")


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null at the end"
    )


class StateEventOut(BaseModel):
    time: datetime
    state: State
    source: str
    seq: int | None
    received_at: datetime


class HeartbeatHourOut(BaseModel):
    hour: datetime = Field(description="the hour's start (UTC)")
    heartbeats: int = Field(description="heartbeats stored for the device in that hour")
    active: int = Field(description="how many of them said the device was Active")
    last_at: datetime = Field(description="the time of the hour's last heartbeat")


class ClassUsage(BaseModel):
    peak: int
    peak_at: datetime
    amount: str = Field(
        description="what this quantity costs on the month's plan, tax excluded (exact decimal)"
    )


class MeteredClassUsage(ClassUsage):
    metric: Literal["peak", "distinct"] = Field(
        description="what `peak` counts, as the plan says (SPEC M2, M6): `peak` the most "
        "devices Active at one instant of the month, at `peak_at`; `distinct` every device "
        "Active at any instant of the month, the last of them first Active at `peak_at`"
    )


class CorrectedUsage(BaseModel):
    peak: int
    peak_at: datetime


class Totals(BaseModel):
    subtotal: str = Field(description="tax excluded, adjustments included")
    tax_rate: str = Field(description="the rate in force on the month's first day, e.g. 0.10")
    tax: str
    total: str = Field(description="subtotal plus tax")
    credits_applied: str = Field(description="credit points applied at close (P4)")
    amount_due: str = Field(description="what is charged to the payment method")


class UsageOut(Totals):
    account: str
    month: str
    status: Literal["preliminary", "final"]
    plan: str = Field(description="the plan that prices this month (in force at its start)")
    currency: str
    period_start: datetime
    period_end: datetime
    classes: dict[str, MeteredClassUsage]
    corrected: dict[str, CorrectedUsage] | None = Field(
        default=None,
        description="closed months only: the quantities recomputed from every event stored "
        "now, late ones included; a difference is adjusted on the next statement",
    )


class DayClass(BaseModel):
    peak: int
    end_of_day: int


class DayOut(BaseModel):
    date: date
    classes: dict[str, DayClass]


class DailyUsageOut(BaseModel):
    account: str
    month: str
    status: Literal["preliminary", "final"]
    timezone: str
    days: list[DayOut]
    peak: dict[str, MeteredClassUsage]


class LineOut(BaseModel):
    kind: str
    device_class: str | None = Field(alias="class")
    description: str
    quantity: int
    unit_price: str
    amount: str
    tier: int | None
    corrects_month: str | None = Field(
        default=None, description="adjustment lines: the closed month (YYYY-MM) corrected"
    )
    billed_quantity: int | None = None
    corrected_quantity: int | None = None
    tax_rate: str | None = Field(
        default=None, description="adjustment lines: the corrected month's tax rate"
    )


class StatementOut(Totals):
    account: str
    month: str
    status: Literal["preliminary", "final"]
    plan: str
    currency: str
    period_start: datetime
    period_end: datetime
    lines: list[LineOut]
    due_date: date
    closed_at: datetime | None
    usage: dict[str, ClassUsage]


class StatementSummary(BaseModel):
    month: str
    status: Literal["final"]
    plan: str
    currency: str
    subtotal: str
    tax: str
    credits_applied: str
    amount_due: str
    due_date: date
    closed_at: datetime


class MemberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    role: Literal["manager", "developer"]
    email: str | None = Field(default=None, max_length=254)


class KeyOut(BaseModel):
    id: int
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(BaseModel):
    id: int
    member_id: int
    prefix: str
    key: str = Field(description="the new API key, shown this once")


class MemberOut(BaseModel):
    id: int
    name: str
    email: str | None
    role: str
    created_at: datetime
    keys: list[KeyOut]


class MemberCreated(BaseModel):
    id: int
    name: str
    role: str
    key_id: int
    key: str = Field(description="the member's API key, shown this once")


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=63, examples=["acme"])
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    plan: str = Field(min_length=1, max_length=100, examples=["standard"])
    country: str = Field(min_length=2, max_length=2, examples=["JP"])
    timezone: str | None = Field(default=None, max_length=100, examples=["Asia/Tokyo"])
    signed_up_on: InputDate | None = None
    owner_name: str = Field(default="owner", min_length=1, max_length=200, pattern=NO_NUL)
    owner_email: str | None = Field(default=None, max_length=254, pattern=NO_NUL)


class AccountOut(BaseModel):
    id: int
    ref: str
    name: str
    plan: str
    country: str
    timezone: str
    signed_up_on: date
    status: str
    created_at: datetime


class AccountCreated(AccountOut):
    owner_member_id: int
    owner_key: str = Field(description="the owner's API key, shown this once")


class PaymentMethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["card", "invoice", "convenience_store"] = Field(
        description="invoice: accounts in Japan only", examples=["card"]
    )
    reference: str = Field(
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="the payment provider's token for the method, never a card number",
        examples=["pm_1NqXyzAbc"],
    )


class PaymentMethodOut(BaseModel):
    account: str
    kind: Literal["card", "invoice", "convenience_store"]
    reference: str
    set_at: datetime = Field(description="when this method was put on file")
    source: Literal["api", "console", "cli"] = Field(
        description="where it was set: api or console (the owner), cli (the operator)"
    )


class AccountStatusIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        default=None, max_length=500, pattern=NO_NUL, examples=["payment not confirmed"]
    )


class AccountStatusOut(BaseModel):
    account: str
    status: Literal["active", "suspended"]
    changed: bool = Field(
        description="false when the account already had this status: nothing was recorded"
    )
    changed_at: datetime | None = Field(
        description="the instant of the account's latest suspension or resumption"
    )
    reason: str | None = Field(description="the reason given with that change")


class CloseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    month: str = Field(pattern=r"^\d{4}-\d{2}$", examples=["2026-10"])
    account: str | None = Field(default=None, max_length=63, pattern=NO_NUL)


class CloseOut(BaseModel):
    month: str
    closed: list[str]
    already_closed: list[str]
    not_due: list[str]
    not_applicable: list[str]
    failed: dict[str, str]
    seconds: float


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class RejectionOut(BaseModel):
    id: int
    received_at: datetime = Field(description="when the ingest worker received the message")
    topic: str = Field(description="the MQTT topic it was published on")
    reason: Reason = Field(description="why it was refused (docs/protocol.md, What is refused)")
    detail: str = Field(description="what exactly was wrong, e.g. the field at fault")
    device_id: str | None = Field(description="the device the topic names")
    payload: str = Field(
        description="the stored payload (its first 4 KiB): text when it is UTF-8, else base64"
    )
    payload_encoding: Literal["utf-8", "base64"] = Field(description="how `payload` is written")
    payload_bytes: int = Field(description="how many bytes of the payload were stored")
    payload_truncated: bool = Field(
        description="the stored payload is the full 4 KiB: what followed was cut"
    )


class RejectionsPage(BaseModel):
    items: list[RejectionOut]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next (older) page; null at the end"
    )
    summary: dict[str, int] = Field(
        description="rejections per reason in the window (device_id, since, until; whatever "
        "the reason filter), reasons with none left out"
    )
    summary_complete: bool = Field(
        description="false when the window holds more than 10,000 rejections: the summary "
        "then counts the newest 10,000"
    )


class PlanChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str = Field(min_length=1, max_length=64, pattern=NO_NUL, examples=["standard"])
    at: InputInstant | None = Field(
        default=None,
        description="when the change takes effect (default: now; never in the future). At a "
        "month's first instant it prices that month; later, from the next month (P6).",
    )


class PlanHistoryEntry(BaseModel):
    plan: str
    effective_at: datetime
    recorded_at: datetime
    changed_by: str


class PlanOut(BaseModel):
    account: str
    plan: str = Field(description="the plan in force now")
    history: list[PlanHistoryEntry]


class PlanChangeOut(PlanOut):
    previous_plan: str
    effective_at: datetime
    first_month: str = Field(description="the first month priced at the new plan (YYYY-MM)")
    changed: bool = Field(description="false when the account was already on this plan")


class CreditGrantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # strict: "5" is not 5 points.
    points: int = Field(
        gt=0, le=10**12, strict=True, description="1 point = 1 minor unit of the currency"
    )
    reason: str | None = Field(default=None, max_length=500, pattern=NO_NUL)
    expires: InputDate | None = Field(
        default=None,
        description="the last day (inclusive, account time zone) the points pay for; "
        "default: never",
    )
    at: InputInstant | None = Field(default=None, description="when granted (default: now)")


class LedgerEntryOut(BaseModel):
    id: int
    kind: Literal["grant", "use", "expiry"]
    points: str
    at: datetime
    grant_id: int | None
    expires_on: date | None
    reason: str | None
    month: str | None = Field(description="uses: the month the points paid")
    remaining: str | None = Field(default=None, description="grants: points left")


class CreditsOut(BaseModel):
    account: str
    currency: str
    balance: str = Field(description="points (1 point = 1 minor unit of the currency)")
    balance_amount: str = Field(description="the balance as an amount of the currency")
    ledger: list[LedgerEntryOut]


class CreditGrantOut(CreditsOut):
    granted: LedgerEntryOut


# --- contracts (issue 12) -------------------------------------------------------------------

TermName = Literal["monthly", "annual"]
#: Committed devices per class: at most a million of one class (a typo, not a fleet, beyond).
Commitments = dict[
    Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)],
    Annotated[int, Field(ge=0, le=1_000_000, strict=True)],
]
_AT = (
    "when the request is made (default: now; never in the future, never before 1970); the "
    "operator's back-fill and tests name an instant"
)


class ContractStartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    term: TermName
    commitments: Commitments = Field(
        default_factory=dict, description="committed devices per class, billed with each term"
    )
    at: InputInstant | None = Field(default=None, description=_AT)


class ContractChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = Field(default=None, min_length=1, max_length=64, pattern=NO_NUL)
    commitments: Commitments = Field(
        default_factory=dict, description="the classes to change; 0 removes a commitment"
    )
    at: InputInstant | None = Field(default=None, description=_AT)
    dry_run: bool = Field(
        default=False, description="say what it would do and cost; change nothing"
    )


class ContractSwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    term: TermName
    at: InputInstant | None = Field(default=None, description=_AT)
    dry_run: bool = False


class ContractCancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_after: str | None = Field(
        default=None,
        pattern=r"^[0-9]{4}-[0-9]{2}$",
        description="the last month of service (YYYY-MM); default: the earliest term end",
    )
    at: InputInstant | None = Field(default=None, description=_AT)
    dry_run: bool = False


class ChargesIssueIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    until: InputInstant = Field(description="issue every charge due up to this instant")
    account: str | None = Field(default=None, max_length=63, pattern=NO_NUL)


class ContractRequestEntry(BaseModel):
    id: int = Field(description="0 for a request not saved (a dry run)")
    kind: Literal["start", "change", "switch", "cancel"]
    requested_at: str
    effect: Literal["now", "restart", "term_end", "following_term_end"] | None
    effective_at: str | None = Field(description="when it took or takes effect")
    effective_on: date | None
    term: TermName | None
    plan: str | None
    commitments: dict[str, int] | None
    end_after: str | None


class ContractTermOut(BaseModel):
    term: TermName
    start: date
    end: date = Field(description="the last day, as the seeds write it")
    starts_at: str
    ends_at: str
    plan: str
    commitments: dict[str, int]
    fee: str


class DayPeriod(BaseModel):
    start: date
    end: date


class ContractOut(BaseModel):
    """Instants are RFC 3339 in the account's zone; days are local days."""

    account: str
    contract: int | None
    status: Literal["none", "free_period", "active", "ending", "ended"]
    at: str
    policy: Literal["calendar", "anniversary"] | None = None
    currency: str | None = None
    timezone: str | None = None
    started_at: str | None = None
    free_period: DayPeriod | None = None
    plan: str | None = None
    commitments: dict[str, int] | None = None
    term: TermName | None = None
    term_start: date | None = None
    term_end: date | None = None
    term_starts_at: str | None = None
    term_ends_at: str | None = None
    term_fee: str | None = None
    renews_at: str | None = None
    next_invoice_at: str | None = None
    next_invoice_on: date | None = None
    cancellation_deadline: date | None = Field(
        default=None,
        description="the last day a cancellation, decrease or switch takes "
        "effect at this term's end",
    )
    cancellation_deadline_at: str | None = None
    ends_at: str | None = None
    last_day: date | None = None
    next_term: ContractTermOut | None = None
    scheduled_changes: list[ContractRequestEntry] = Field(default_factory=list)
    requests: list[ContractRequestEntry] = Field(default_factory=list)


class ChargeShare(BaseModel):
    part: int
    whole: int
    unit: Literal["months", "seconds"]


class ChargeOut(BaseModel):
    id: int | None = Field(description="null for a charge quoted, not issued")
    contract: int
    kind: Literal["term_fee", "proration", "refund"]
    description: str
    plan: str
    term: TermName
    period_start: date
    period_end: date = Field(description="the last day, as the seeds write it")
    starts_at: str
    ends_at: str
    share: ChargeShare | None
    currency: str
    amount: str
    tax_rate: str
    tax: str
    total: str
    credits_applied: str
    amount_due: str
    issued_at: str
    issued_on: date
    due_date: date
    change: int | None


class ChargesOut(BaseModel):
    account: str
    charges: list[ChargeOut]


class ContractRequestOut(BaseModel):
    account: str
    changed: bool = Field(description="false when the contract already was as asked")
    request: ContractRequestEntry
    charges: list[ChargeOut] = Field(description="what the request charges (or would)")
    issued: list[ChargeOut] = Field(description="charges issued now, up to the request's instant")
    contract: ContractOut
    dry_run: bool = False


class ChargesIssueOut(BaseModel):
    until: str
    accounts: int
    issued: list[ChargeOut]
    failed: dict[str, str]
