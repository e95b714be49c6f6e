"""The device registry: accounts with their owner and API key, devices and their state.

Functions take an open connection and run inside the caller's transaction; they never
commit, so a caller can group several in one unit of work (and a refused call changes nothing).
"""

from __future__ import annotations

import re
import secrets as _random
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row

from devmeter.config import validate_timezone
from devmeter.db import load_queries
from devmeter.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError
from metering.catalog import Catalog
from metering.secrets import (
    API_KEY_PREFIX,
    DEVICE_KEY_PREFIX,
    broker_hash,
    nats_hash,
    new_secret,
)

Q = load_queries("metering")

State = Literal["active", "inactive"]
EventSource = Literal["registration", "console", "api", "cli", "heartbeat", "gateway", "import"]
Conn = psycopg.Connection[Any]

# `\Z`, not `$`: `$` also matches before a trailing newline, which the database's own checks
# then refuse with an error instead of this module's clear one.
ACCOUNT_REF = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
# Device ids appear in MQTT topics: no '/', '+', '#' or spaces.
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
COUNTRY = re.compile(r"^[A-Z]{2}\Z")
GATEWAY_CLASS = "gateway"


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    ref: str
    name: str
    plan: str
    country: str
    timezone: str
    signed_up_on: date
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    account_id: int
    account_ref: str
    device_class: str
    name: str | None
    gateway_id: str | None
    key_prefix: str
    registered_at: datetime
    state: State
    #: The device's latest event or in-order heartbeat: the instant writers order against (D3).
    state_at: datetime
    last_seen_at: datetime | None
    #: When the device entered its current state ("state since"; migration 0011).
    state_since: datetime


@dataclass(frozen=True, slots=True)
class StateEvent:
    time: datetime
    state: State
    source: str
    seq: int | None
    received_at: datetime


@dataclass(frozen=True, slots=True)
class HeartbeatHour:
    """One hour (UTC) of a device's heartbeats: how many, how many said Active, the last."""

    hour: datetime
    heartbeats: int
    active: int
    last_at: datetime


@dataclass(frozen=True, slots=True)
class CreatedAccount:
    account: Account
    owner_member_id: int
    api_key: str

    def __repr__(self) -> str:
        return f"CreatedAccount(account={self.account!r}, owner_member_id={self.owner_member_id})"


@dataclass(frozen=True, slots=True)
class RegisteredDevice:
    device: Device
    key: str

    def __repr__(self) -> str:
        return f"RegisteredDevice(device={self.device!r})"


def create_account(
    conn: Conn,
    catalog: Catalog,
    *,
    ref: str,
    name: str,
    plan: str,
    country: str,
    timezone: str,
    signed_up_on: date,
    owner_name: str = "owner",
    owner_email: str | None = None,
) -> CreatedAccount:
    """Create an account, its owner (A1: the first member) and the owner's API key."""
    if not ACCOUNT_REF.match(ref):
        raise InvalidError(
            f"invalid account ref {ref!r}: lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 63 characters",
            field="ref",
        )
    if not name.strip() or len(name) > 200:
        raise InvalidError("account name must be 1 to 200 characters", field="name")
    if plan not in catalog.plans:
        known = ", ".join(sorted(catalog.plans))
        raise InvalidError(f"unknown plan {plan!r} (catalog has: {known})", field="plan")
    if not COUNTRY.match(country):
        raise InvalidError(
            f"invalid country {country!r}: expected an ISO 3166 code such as JP", field="country"
        )
    if country not in catalog.tax:
        known = ", ".join(sorted(catalog.tax))
        raise InvalidError(
            f"no tax table for country {country!r} in the catalog (it has: {known})",
            field="country",
        )
    try:
        validate_timezone(timezone)
    except ValueError as exc:
        raise InvalidError(str(exc), field="timezone") from exc

    with conn.cursor(row_factory=class_row(Account)) as cur:
        account = cur.execute(
            Q["insert_account"],
            {
                "ref": ref,
                "name": name,
                "plan": plan,
                "country": country,
                "timezone": timezone,
                "signed_up_on": signed_up_on,
            },
        ).fetchone()
    if account is None:
        raise ConflictError(f"account {ref!r} already exists", field="ref")
    conn.execute(
        Q["insert_signup_plan"],
        {
            "account_id": account.id,
            "plan": plan,
            "signed_up_on": signed_up_on,
            "timezone": timezone,
        },
    )
    member = conn.execute(
        Q["insert_member"],
        {"account_id": account.id, "name": owner_name, "email": owner_email, "role": "owner"},
    ).fetchone()
    assert member is not None
    key = new_secret(API_KEY_PREFIX)
    conn.execute(
        Q["insert_api_key"],
        {
            "member_id": member["id"],
            "account_id": account.id,
            "prefix": key.prefix,
            "key_hash": key.digest,
        },
    )
    return CreatedAccount(account, int(member["id"]), key.plaintext)


def get_account(conn: Conn, ref: str) -> Account:
    with conn.cursor(row_factory=class_row(Account)) as cur:
        account = cur.execute(Q["select_account_by_ref"], {"ref": ref}).fetchone()
    if account is None:
        raise NotFoundError(f"unknown account {ref!r}", field="account")
    return account


def register_device(
    conn: Conn,
    catalog: Catalog,
    *,
    account_ref: str,
    device_class: str,
    at: datetime,
    device_id: str | None = None,
    gateway_id: str | None = None,
    name: str | None = None,
    source: EventSource = "registration",
) -> RegisteredDevice:
    """Register a device Active at ``at`` (D1): billing counts it from that instant."""
    _require_aware(at)
    _refuse_nul(name=name, gateway_id=gateway_id, id=device_id, **{"class": device_class})
    account = get_account(conn, account_ref)
    _require_not_suspended(account)
    plan = catalog.plans[account.plan]
    if plan.payment_method_required:
        _require_payment_method(conn, account)
    if plan.contract_required:
        _require_contract(conn, catalog, account, at)
    classes = plan.classes
    if device_class not in classes:
        known = ", ".join(sorted(classes))
        raise InvalidError(
            f"plan {account.plan!r} has no device class {device_class!r} (it has: {known})",
            field="class",
        )
    if device_id is None:
        device_id = "dev-" + _random.token_hex(8)
    elif not DEVICE_ID.match(device_id):
        raise InvalidError(
            f"invalid device id {device_id!r}: letters, digits, '.', '-' and '_', "
            "starting with a letter or digit, at most 64 characters",
            field="id",
        )
    if name is not None and len(name) > 200:
        raise InvalidError("device name must be at most 200 characters", field="name")
    if gateway_id is not None:
        gateway = _lock_device(conn, gateway_id, account.id, field="gateway_id")
        if gateway.device_class != GATEWAY_CLASS:
            raise InvalidError(
                f"device {gateway_id!r} is of class {gateway.device_class!r}, not a gateway",
                field="gateway_id",
            )

    key = new_secret(DEVICE_KEY_PREFIX)
    inserted = conn.execute(
        Q["insert_device"],
        {
            "id": device_id,
            "account_id": account.id,
            "device_class": device_class,
            "name": name,
            "gateway_id": gateway_id,
            "key_prefix": key.prefix,
            "key_hash": key.digest,
            "registered_at": at,
        },
    ).fetchone()
    if inserted is None:
        # Only this account's ids can collide (D1a): the message reveals nothing of others.
        raise ConflictError(
            f"device {device_id!r} already exists in account {account.ref!r}", field="id"
        )
    _store_credential(conn, account.id, device_id, key.plaintext, at)
    _insert_event(conn, device_id, account.id, device_class, "active", at, source)
    device = _lock_device(conn, device_id, account.id, field="id")
    return RegisteredDevice(device, key.plaintext)


def rotate_device_key(
    conn: Conn, *, device_id: str, at: datetime, account_id: int | None = None
) -> RegisteredDevice:
    """Issue a new key for a device; the old one stops working (D1).

    The broker sync reloads the broker's credentials on the change (a trigger notifies it), so
    the old key is refused from then on, and a connection made with it is closed.
    """
    _require_aware(at)
    device = _lock_device(conn, device_id, account_id, field="device")
    key = new_secret(DEVICE_KEY_PREFIX)
    conn.execute(
        Q["update_device_key"],
        {
            "account_id": device.account_id,
            "id": device.id,
            "key_prefix": key.prefix,
            "key_hash": key.digest,
        },
    )
    _store_credential(conn, device.account_id, device.id, key.plaintext, at)
    return RegisteredDevice(
        _lock_device(conn, device.id, device.account_id, field="device"), key.plaintext
    )


def set_device_state(
    conn: Conn,
    *,
    device_id: str,
    state: State,
    at: datetime,
    source: EventSource,
    account_id: int | None = None,
) -> Device:
    """Set a device Active or Inactive at ``at`` (D2), recording a state event on a change.

    Idempotent: asking for the state the device is already in records nothing and returns the
    device as it is, so a repeated deactivate leaves one event, as the API documents. The
    trade-off: a heartbeat dated between the device's latest event and a repeated request,
    arriving after it, is not overruled by it (a recorded repeat would have ended its effect at
    ``at``); the device follows its own report, as D3 orders events by time, and the caller can
    deactivate again. ``at`` is moved up to the device's latest known event or heartbeat when it
    is earlier (a device clock ahead, or a batch committed while this waited for the device's
    lock): the devices row and the events then agree. ``account_id`` scopes the lookup for
    callers acting for one account (A4): another account's device is "not found", never
    "forbidden".
    """
    _require_aware(at)
    if state not in ("active", "inactive"):
        raise InvalidError(f"invalid state {state!r}: active or inactive", field="state")
    device = _lock_device(conn, device_id, account_id, field="device")
    if device.state == state:
        return device
    at = max(at, device.state_at)
    if state == "active" and device.state != "active":
        account = conn.execute(Q["select_account_by_id"], {"id": device.account_id}).fetchone()
        assert account is not None
        if account["status"] == "suspended":
            raise ForbiddenError(
                f"account {account['ref']!r} is suspended: devices cannot be activated",
                field="account",
            )
    _insert_event(conn, device.id, device.account_id, device.device_class, state, at, source)
    return _lock_device(conn, device.id, device.account_id, field="device")


def list_devices(conn: Conn, account_ref: str) -> list[Device]:
    account = get_account(conn, account_ref)
    with conn.cursor(row_factory=class_row(Device)) as cur:
        return cur.execute(Q["select_devices_of_account"], {"account_id": account.id}).fetchall()


def search_devices(
    conn: Conn,
    account_id: int,
    *,
    state: str | None = None,
    device_class: str | None = None,
    gateway_id: str | None = None,
    text: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[Device]:
    """One page of an account's devices in id order; ``after`` is the last id of the previous
    page (keyset paging: stable while devices are added, and no OFFSET scan)."""
    _refuse_nul(
        state=state, gateway_id=gateway_id, text=text, after=after, **{"class": device_class}
    )
    pattern = None
    if text:
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    with conn.cursor(row_factory=class_row(Device)) as cur:
        return cur.execute(
            Q["search_devices"],
            {
                "account_id": account_id,
                "state": state,
                "device_class": device_class,
                "gateway_id": gateway_id,
                "pattern": pattern,
                "after": after,
                "limit": limit,
            },
        ).fetchall()


def get_device(conn: Conn, device_id: str, account_id: int) -> Device:
    """A device of this account; another account's device is "unknown", never "forbidden"."""
    if "\x00" in device_id:
        raise NotFoundError(f"unknown device {device_id!r}", field="device_id")
    with conn.cursor(row_factory=class_row(Device)) as cur:
        device = cur.execute(
            Q["select_device"], {"id": device_id, "account_id": account_id}
        ).fetchone()
    if device is None:
        raise NotFoundError(f"unknown device {device_id!r}", field="device_id")
    return device


def heartbeat_hours(
    conn: Conn, device_id: str, account_id: int, since: datetime, until: datetime
) -> list[HeartbeatHour]:
    """The device's heartbeats per hour over the whole hours from ``since``'s to ``until``,
    oldest first; hours without a heartbeat are left out. From the continuous aggregate in
    TimescaleDB mode, from the raw rows in plain mode (same function, migration 0007)."""
    get_device(conn, device_id, account_id)
    with conn.cursor(row_factory=class_row(HeartbeatHour)) as cur:
        return cur.execute(
            "SELECT * FROM device_heartbeats_hourly("
            "%(account_id)s, %(device_id)s, %(from)s, %(to)s)",
            {
                "account_id": account_id,
                "device_id": device_id,
                "from": since.astimezone(UTC).replace(minute=0, second=0, microsecond=0),
                "to": until,
            },
        ).fetchall()


def device_events(conn: Conn, device_id: str, account_id: int | None = None) -> list[StateEvent]:
    device = _lock_device(conn, device_id, account_id, field="device")
    with conn.cursor(row_factory=class_row(StateEvent)) as cur:
        return cur.execute(
            Q["select_state_events_of_device"],
            {"account_id": device.account_id, "device_id": device.id},
        ).fetchall()


def _insert_event(
    conn: Conn,
    device_id: str,
    account_id: int,
    device_class: str,
    state: State,
    at: datetime,
    source: EventSource,
    seq: int | None = None,
) -> None:
    params = {
        "time": at,
        "device_id": device_id,
        "account_id": account_id,
        "device_class": device_class,
        "state": state,
        "source": source,
        "seq": seq,
    }
    conn.execute(Q["insert_state_event"], params)
    conn.execute(Q["update_device_state"], params)


def _store_credential(conn: Conn, account_id: int, device_id: str, key: str, at: datetime) -> None:
    # Both brokers' hashes of the one key, in the caller's transaction: a registration or
    # rotation reaches Mosquitto and NATS together, and never one without the other.
    conn.execute(
        Q["upsert_device_credential"],
        {
            "account_id": account_id,
            "id": device_id,
            "broker_hash": broker_hash(key),
            "nats_hash": nats_hash(key),
            "at": at,
        },
    )


def _refuse_nul(**values: str | None) -> None:
    # PostgreSQL text cannot hold U+0000: refuse it as the caller's mistake, not a server error.
    for field, value in values.items():
        if value is not None and "\x00" in value:
            raise InvalidError(f"{field} must not contain NUL (U+0000)", field=field)


def resolve_device_account(conn: Conn, device_id: str, account_ref: str | None = None) -> int:
    """The account of device ``device_id``, for operator commands that name a device.

    With ``account_ref`` the device must be in that account. Without it the id must be
    unambiguous: ids are unique per account only (D1a), so an id that two accounts use asks
    for the account instead of picking one.
    """
    if account_ref is not None:
        return get_account(conn, account_ref).id
    if "\x00" in device_id:
        raise NotFoundError(f"unknown device {device_id!r}", field="device")
    rows = conn.execute(Q["select_device_accounts"], {"id": device_id}).fetchall()
    if not rows:
        raise NotFoundError(f"unknown device {device_id!r}", field="device")
    if len(rows) > 1:
        raise InvalidError(
            f"device id {device_id!r} exists in more than one account: name the account",
            field="account",
        )
    return int(rows[0]["account_id"])


def _lock_device(conn: Conn, device_id: str, account_id: int | None, *, field: str) -> Device:
    if "\x00" in device_id:
        raise NotFoundError(f"unknown device {device_id!r}", field=field)
    if account_id is None:
        account_id = resolve_device_account(conn, device_id)
    with conn.cursor(row_factory=class_row(Device)) as cur:
        device = cur.execute(
            Q["select_device_for_update"], {"id": device_id, "account_id": account_id}
        ).fetchone()
    if device is None:
        raise NotFoundError(f"unknown device {device_id!r}", field=field)
    return device


def _require_not_suspended(account: Account) -> None:
    if account.status == "suspended":
        raise ForbiddenError(
            f"account {account.ref!r} is suspended: devices cannot be registered", field="account"
        )


def _require_payment_method(conn: Conn, account: Account) -> None:
    # A2: a paid plan needs a payment method on file before a device can be registered. Only
    # registration asks: a device registered before, or reactivated, is not refused.
    on_file = conn.execute(Q["select_current_payment_method"], {"account_id": account.id})
    if on_file.fetchone() is None:
        raise ConflictError(payment_method_required_message(account.plan), field="payment_method")


def _require_contract(conn: Conn, catalog: Catalog, account: Account, at: datetime) -> None:
    """Issue 12: a plan that requires a contract registers devices only while one runs."""
    from metering.contracts import in_force

    if not in_force(conn, catalog, account, at):
        raise ConflictError(
            f"plan {account.plan!r} requires a contract before devices can be registered: "
            "the owner starts one with POST /v1/contract (operator: devmeter contracts start)",
            field="contract",
        )


def payment_method_required_message(plan: str) -> str:
    return (
        f"plan {plan!r} needs a payment method on file before devices can be registered: "
        "the account owner sets one with PUT /v1/payment-method or on the console's Account "
        "page (operator: devmeter accounts set-payment-method)"
    )


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("instants must be timezone-aware")
