"""Account controls: the payment method on file (SPEC A2) and suspension by the operator (A3).

Both are append-only histories (migration 0013): a new payment method or a status change adds
a row, and what is in force is the latest. Functions take an open connection and never commit,
like the rest of ``metering``; a refusal raises before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import class_row

from devmeter.db import load_queries
from devmeter.errors import InvalidError, NotFoundError
from metering.registry import ACCOUNT_REF, Account, get_account

Q = load_queries("metering")

Conn = psycopg.Connection[Any]
PaymentKind = Literal["card", "invoice", "convenience_store"]
PAYMENT_KINDS: Final[tuple[PaymentKind, ...]] = ("card", "invoice", "convenience_store")
#: A2: invoice (bank transfer against a monthly invoice) is offered in Japan only.
INVOICE_COUNTRIES: Final = frozenset({"JP"})
PaymentSource = Literal["api", "console", "cli"]
AccountStatus = Literal["active", "suspended"]
StatusSource = Literal["api", "cli"]

#: What a payment provider's token looks like: `pm_1Nq...`, `cus_...`, `src-...`, a URN.
REFERENCE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+=-]{0,199}\Z")
#: 13 or more digits with nothing but spaces or punctuation between them: how a card number
#: (PAN, 13 to 19 digits) is written or pasted; a longer run may hold one. Searched for anywhere
#: in a reference, not only as the whole of it, so that `pm_4242424242424242` is refused too;
#: the cost is that an invoice number with 13 digits or more is refused as well, which is the
#: side to err on with card data.
_PAN: Final = re.compile(r"[0-9](?:[^0-9A-Za-z]*[0-9]){12}")
MAX_REASON: Final = 500


@dataclass(frozen=True, slots=True)
class PaymentMethod:
    id: int
    account_ref: str
    kind: PaymentKind
    reference: str
    #: The owner who set it; None when the operator did (CLI).
    member_id: int | None
    source: PaymentSource
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: AccountStatus
    reason: str | None
    source: StatusSource
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class StatusResult:
    account: Account
    #: False when the account already had the status asked for: nothing was recorded.
    changed: bool
    #: The account's latest status change (None if its status never changed).
    last_change: StatusChange | None


def looks_like_card_number(reference: str) -> bool:
    """True when the text holds 13 digits or more in a row (spaces, dashes or other punctuation
    between them allowed).

    Pure. devmeter stores a payment provider's token, never card data: refusing anything that
    could be a PAN keeps one from being stored by mistake (a pasted number, a test card).
    """
    return _PAN.search(reference) is not None


def check_payment_method(kind: str, reference: str, country: str) -> PaymentKind:
    """The kind, if ``kind`` and ``reference`` may be registered for an account in ``country``.

    Pure; raises InvalidError naming the field at fault.
    """
    if kind not in PAYMENT_KINDS:
        raise InvalidError(
            f"invalid payment method kind {kind!r}: one of {', '.join(PAYMENT_KINDS)}",
            field="kind",
        )
    if kind == "invoice" and country not in INVOICE_COUNTRIES:
        raise InvalidError(
            f"payment by invoice is only for accounts in Japan (this account's country is "
            f"{country}): choose card or convenience_store",
            field="kind",
        )
    if looks_like_card_number(reference):
        raise InvalidError(
            "the reference looks like a card number: devmeter never stores card numbers; "
            "register the payment provider's token for the card instead (e.g. pm_...)",
            field="reference",
        )
    if not REFERENCE.match(reference):
        raise InvalidError(
            f"invalid reference {reference[:40]!r}: the payment provider's token, 1 to 200 "
            "letters, digits and . _ : / + = -, starting with a letter or digit",
            field="reference",
        )
    return next(k for k in PAYMENT_KINDS if k == kind)


def current_payment_method(conn: Conn, account_id: int) -> PaymentMethod | None:
    with conn.cursor(row_factory=class_row(PaymentMethod)) as cur:
        return cur.execute(
            Q["select_current_payment_method"], {"account_id": account_id}
        ).fetchone()


def set_payment_method(
    conn: Conn,
    *,
    account_ref: str,
    kind: str,
    reference: str,
    at: datetime,
    source: PaymentSource,
    member_id: int | None = None,
) -> tuple[PaymentMethod, bool]:
    """Register the account's payment method from ``at`` on; (the method in force, changed).

    Setting the method already in force (same kind and reference) records nothing, so a
    repeated PUT is idempotent. Who may call this is the caller's business: the API and the
    console allow the owner only (A1), the CLI is the operator's.
    """
    account = get_account(conn, account_ref)
    checked = check_payment_method(kind, reference, account.country)
    current = current_payment_method(conn, account.id)
    if current is not None and (current.kind, current.reference) == (checked, reference):
        return current, False
    conn.execute(
        Q["insert_payment_method"],
        {
            "account_id": account.id,
            "kind": checked,
            "reference": reference,
            "member_id": member_id,
            "source": source,
            "at": at,
        },
    )
    found = current_payment_method(conn, account.id)
    assert found is not None
    return found, True


def set_account_status(
    conn: Conn,
    *,
    account_ref: str,
    status: AccountStatus,
    at: datetime,
    source: StatusSource,
    reason: str | None = None,
) -> StatusResult:
    """Suspend or resume an account (A3), recording the change with its instant and reason.

    Idempotent: asking for the status the account already has changes and records nothing
    (``changed`` is False), so a retried suspension is harmless. Only registration and
    activation look at the status (metering/registry.py); ingest and month close do not, so a
    suspended account's heartbeats are still stored and its months still close.
    """
    if status not in ("active", "suspended"):
        raise InvalidError(f"invalid status {status!r}: active or suspended", field="status")
    if reason is not None:
        reason = reason.strip() or None
    if reason is not None and (len(reason) > MAX_REASON or "\x00" in reason):
        raise InvalidError(
            f"the reason must be at most {MAX_REASON} characters, without NUL", field="reason"
        )
    if "\x00" in account_ref or not ACCOUNT_REF.match(account_ref):
        raise NotFoundError(f"unknown account {account_ref!r}", field="account")
    with conn.cursor(row_factory=class_row(Account)) as cur:
        account = cur.execute(Q["select_account_for_update"], {"ref": account_ref}).fetchone()
    if account is None:
        raise NotFoundError(f"unknown account {account_ref!r}", field="account")
    changed = account.status != status
    if changed:
        params = {"account_id": account.id, "status": status, "reason": reason, "at": at}
        conn.execute(Q["update_account_status"], params)
        conn.execute(Q["insert_account_status_change"], params | {"source": source})
        account = get_account(conn, account_ref)
    history = status_changes(conn, account.id, limit=1)
    return StatusResult(account, changed, history[0] if history else None)


def status_changes(conn: Conn, account_id: int, *, limit: int = 20) -> list[StatusChange]:
    """The account's latest status changes, newest first."""
    with conn.cursor(row_factory=class_row(StatusChange)) as cur:
        return cur.execute(
            Q["select_account_status_changes"], {"account_id": account_id, "limit": limit}
        ).fetchall()
