"""Contracts (issue 12): load an account's contract, replay it, save requests and charges.

Glue only: the date rules are metering/periods.py's, what a request does and which charges a
contract owes are metering/terms.py's. Every writer locks the account's row first, as the
month close does, so two requests (or two issuers, or an issuer and a close) of one account
take turns; a charge's unique key (contract, what it is for) makes a second issue of it a
no-op, so two schedulers issuing the same term make one charge.

A contract is the requests it was made of, in order; the service refuses one dated before
the contract's latest request or latest issued charge (a charge issued is final, and a
request before it would have changed it). Charges are issued when due: by the scheduler as
time passes, by ``devmeter charges issue --until`` for back-fill, and by each request up to
its own instant (an anniversary upgrade is charged at once). Each is taxed on its own (SPEC
P3: at the rate in force on the day its period starts, rounded per jurisdiction) and paid by
credit points as a statement is (P4): by grants that exist when it is recorded and expire on
or after its issue day, oldest-expiring first.

Instants in documents are written in the account's zone ("2017-11-01T00:00:00+09:00"), as
the seeds read them; days are local days, a period's last day the one before its end's day.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import psycopg
from psycopg.rows import class_row, dict_row

from devmeter.errors import ConflictError, InvalidError, NotFoundError
from metering import credits
from metering.catalog import Catalog, Plan
from metering.periods import (
    TERMS,
    Policy,
    TermLength,
    deadline,
    due_date,
    last_day,
    local_date,
    zone,
)
from metering.plans import follow_contract, plans_at
from metering.pricing import format_money, tax_amount
from metering.registry import Account, get_account
from metering.terms import Charge, Content, Outcome, Request, Simulation, term_value

log = logging.getLogger("devmeter.contracts")

Conn = psycopg.Connection[Any]

#: A request's instant may be this far ahead of the clock (two machines' clocks).
_CLOCK_SKEW: Final = timedelta(seconds=5)
_ISSUER: Final = f"{socket.gethostname()}:{os.getpid()}"
#: The id a request has before it is stored (ids are identities, from 1).
_UNSAVED: Final = 0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: More committed devices of one class than this is a typo, not a fleet.
MAX_COMMITMENT: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Contract:
    id: int
    account_id: int
    policy: Policy
    currency: str
    timezone: str
    started_at: datetime
    requests: tuple[Request, ...]


@dataclass(slots=True)
class IssueReport:
    until: datetime
    issued: list[dict[str, Any]] = field(default_factory=list)
    accounts: int = 0
    failed: dict[str, str] = field(default_factory=dict)


# --- loading and replaying -------------------------------------------------------------------


def _lock(conn: Conn, account: Account) -> None:
    conn.execute("SELECT id FROM accounts WHERE id = %s FOR UPDATE", (account.id,))


def _contracts(conn: Conn, account_id: int) -> list[Contract]:
    """The account's contracts with their requests, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        heads = cur.execute(
            "SELECT id, account_id, policy, currency, timezone, started_at FROM contracts"
            " WHERE account_id = %s ORDER BY started_at, id",
            (account_id,),
        ).fetchall()
        rows = cur.execute(
            "SELECT * FROM contract_changes WHERE contract_id = ANY(%s) ORDER BY requested_at, id",
            ([h["id"] for h in heads],),
        ).fetchall()
    requests: dict[int, list[Request]] = {}
    for row in rows:
        requests.setdefault(row["contract_id"], []).append(_request_of(row))
    return [
        Contract(
            h["id"],
            h["account_id"],
            h["policy"],
            h["currency"],
            h["timezone"],
            h["started_at"].astimezone(UTC),
            tuple(requests.get(h["id"], ())),
        )
        for h in heads
    ]


def _request_of(row: Mapping[str, Any]) -> Request:
    content = None
    if row["plan"] is not None:
        content = Content.of(row["plan"], row["commitments"] or {})
    values = None
    if row["value_before"] is not None and row["value_after"] is not None:
        values = (row["value_before"], row["value_after"])
    return Request(
        id=row["id"],
        kind=row["kind"],
        at=row["requested_at"].astimezone(UTC),
        term=row["term"],
        content=content,
        end_after=row["end_after"],
        effect=row["effect"],
        values=values,
    )


def _pricer(catalog: Catalog) -> Callable[[Content, TermLength], Decimal]:
    def value(content: Content, length: TermLength) -> Decimal:
        plan = catalog.plans.get(content.plan)
        if plan is None:
            raise InvalidError(
                f"the contract is on plan {content.plan!r}, which the catalog lacks",
                field="plan",
            )
        return term_value(plan, content.commitments, length)

    return value


def _replay(catalog: Catalog, contract: Contract, until: datetime | None = None) -> Simulation:
    """The contract with its requests up to ``until`` (all of them without), advanced to it."""
    first, *rest = contract.requests
    sim = Simulation(contract.policy, contract.timezone, contract.currency, _pricer(catalog), first)
    for request in rest:
        if until is None or request.at <= until:
            sim.apply(request)
    if until is not None:
        sim.advance(until)
    return sim


# --- requests --------------------------------------------------------------------------------


def _check_at(at: datetime, now: datetime, what: str = "at") -> datetime:
    if at.tzinfo is None:
        raise InvalidError(f"{what} needs a UTC offset, e.g. 2017-10-03T10:00:00+09:00", field=what)
    if at < _EPOCH:
        # Proration counts Unix seconds; and no contract predates devmeter by decades.
        raise InvalidError(f"{what} {at.isoformat()} is before 1970", field=what)
    if at > now + _CLOCK_SKEW:
        done = (
            "a request is recorded when it is made"
            if what == "at"
            else "charges are issued when due"
        )
        raise InvalidError(f"{what} {at.isoformat()} is in the future: {done}", field=what)
    return at.astimezone(UTC)


def _commitments(given: Mapping[str, int]) -> dict[str, int]:
    """Counts only: a class the plan does not price is refused where the term is priced
    (terms.term_value)."""
    for device_class, count in given.items():
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 <= count <= MAX_COMMITMENT
        ):
            raise InvalidError(
                f"committed devices for {device_class!r} must be a whole number from 0 to "
                f"{MAX_COMMITMENT}, got {count!r}",
                field="commit",
            )
    return dict(given)


def _contract_plan(catalog: Catalog, name: str) -> Plan:
    plan = catalog.plans.get(name)
    if plan is None:
        known = ", ".join(sorted(catalog.plans))
        raise InvalidError(f"unknown plan {name!r} (catalog has: {known})", field="plan")
    if plan.contract_policy is None:
        offering = sorted(p.name for p in catalog.plans.values() if p.contract_policy)
        raise InvalidError(
            f"plan {name!r} offers no contract (no contract_policy in the catalog); plans "
            f"that do: {', '.join(offering) or '(none)'}",
            field="plan",
        )
    return plan


def _check_term(term: str) -> TermLength:
    for length in TERMS:
        if term == length:
            return length
    raise InvalidError(f"unknown term {term!r}: monthly or annual", field="term")


def start(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    *,
    term: str,
    commitments: Mapping[str, int],
    at: datetime,
    now: datetime,
    requested_by: str,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> dict[str, Any]:
    """Start a contract on the account's plan at ``at`` (not in the future).

    Refused: a plan without a contract policy, an annual term on a plan without an annual
    price, a class the plan does not price, and an account whose contract is still running.
    """
    at = _check_at(at, now)
    length = _check_term(term)
    _lock(conn, account)
    plan = _contract_plan(catalog, plans_at(conn, [account], at)[account.id])
    assert plan.contract_policy is not None
    content = Content.of(plan.name, _commitments(commitments))
    contracts = _contracts(conn, account.id)
    if contracts:
        latest = contracts[-1]
        sim = _replay(catalog, latest)
        if sim.ended_at is None or sim.ended_at > at:
            ends = f"ends {_iso(sim.ended_at, latest.timezone)}" if sim.ended_at else "runs on"
            raise ConflictError(
                f"account {account.ref!r} has a contract (started "
                f"{_iso(latest.started_at, latest.timezone)}, {ends}): change or cancel it "
                "instead of starting another",
                field="contract",
            )
    request = Request(_UNSAVED, "start", at, term=length, content=content, effect="now")
    # Validates the term and commitments against the plan before anything is written.
    Simulation(plan.contract_policy, account.timezone, plan.currency, _pricer(catalog), request)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO contracts (account_id, policy, currency, timezone, started_at)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (account.id, plan.contract_policy, plan.currency, account.timezone, at),
        ).fetchone()
    assert row is not None
    saved = _save(conn, row["id"], request, requested_by)
    issued = _issue_account(conn, catalog, account, until=at, now=now, on_issued=on_issued)
    contract = _contracts(conn, account.id)[-1]
    return _request_document(catalog, account, contract, saved, True, issued, [], at)


def change(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    *,
    plan: str | None,
    commitments: Mapping[str, int],
    at: datetime,
    now: datetime,
    requested_by: str,
    dry_run: bool = False,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> dict[str, Any]:
    """Change the contract's plan or committed devices (those not named stay as they are).

    Worth more: at once, charged pro rata. Worth less: at a term's end, without refund.
    """
    if plan is None and not commitments:
        raise InvalidError(
            "nothing to change: name a plan (--plan) or commitments (--commit)", field="plan"
        )

    def build(sim: Simulation, contract: Contract) -> Request:
        current = sim.latest_content()
        target = _contract_plan(catalog, plan or current.plan)
        if target.currency != contract.currency:
            raise InvalidError(
                f"plan {target.name!r} bills in {target.currency}, the contract in "
                f"{contract.currency}",
                field="plan",
            )
        if target.contract_policy != contract.policy:
            raise InvalidError(
                f"plan {target.name!r} runs {target.contract_policy} contracts, this contract "
                f"is {contract.policy}: cancel it and start a new one",
                field="plan",
            )
        merged = {**dict(current.commitments), **_commitments(commitments)}
        # Commitments the new plan does not price cannot come along.
        for device_class in merged:
            if device_class not in target.classes:
                raise InvalidError(
                    f"committed device class {device_class!r} is not priced by plan "
                    f"{target.name!r}: set --commit {device_class}=0 with the change",
                    field="commit",
                )
        return Request(_UNSAVED, "change", at, content=Content.of(target.name, merged))

    return _request(
        conn,
        catalog,
        account,
        build,
        at=at,
        now=now,
        by=requested_by,
        dry_run=dry_run,
        on_issued=on_issued,
    )


def switch_term(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    *,
    term: str,
    at: datetime,
    now: datetime,
    requested_by: str,
    dry_run: bool = False,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> dict[str, Any]:
    """Switch between monthly and annual terms (calendar: at a term's end; anniversary: now)."""
    length = _check_term(term)
    return _request(
        conn,
        catalog,
        account,
        lambda _sim, _contract: Request(_UNSAVED, "switch", at, term=length),
        at=at,
        now=now,
        by=requested_by,
        dry_run=dry_run,
        on_issued=on_issued,
    )


def cancel(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    *,
    end_after: str | None,
    at: datetime,
    now: datetime,
    requested_by: str,
    dry_run: bool = False,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> dict[str, Any]:
    """Cancel at the earliest term end, or at the first term end after month ``end_after``."""
    last_month = _parse_month(end_after) if end_after is not None else None
    return _request(
        conn,
        catalog,
        account,
        lambda _sim, _contract: Request(_UNSAVED, "cancel", at, end_after=last_month),
        at=at,
        now=now,
        by=requested_by,
        dry_run=dry_run,
        on_issued=on_issued,
    )


def _parse_month(value: str) -> date:
    from metering.peak import parse_month

    try:
        year, month = parse_month(value)
    except InvalidError as exc:
        raise InvalidError(f"end-after: {exc.message}", field="end_after") from None
    return date(year, month, 1)


def _request(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    build: Callable[[Simulation, Contract], Request],
    *,
    at: datetime,
    now: datetime,
    by: str,
    dry_run: bool,
    on_issued: Callable[[Conn, int], None] | None,
) -> dict[str, Any]:
    at = _check_at(at, now)
    _lock(conn, account)
    contracts = _contracts(conn, account.id)
    if not contracts:
        raise NotFoundError(
            f"account {account.ref!r} has no contract: start one (devmeter contracts start)",
            field="contract",
        )
    contract = contracts[-1]
    with conn.cursor(row_factory=dict_row) as cur:
        latest = cur.execute(
            "SELECT max(issued_at) AS at FROM charges WHERE contract_id = %s", (contract.id,)
        ).fetchone()
    if latest and latest["at"] is not None and at < latest["at"]:
        raise ConflictError(
            f"at {_iso(at, account.timezone)} is before the contract's latest issued charge "
            f"({_iso(latest['at'], account.timezone)}): a request before it would change a "
            "final charge",
            field="at",
        )
    sim = _replay(catalog, contract)
    sim.advance(at)
    request = build(sim, contract)
    outcome = sim.apply(request)
    saved = outcome.request
    issued: list[dict[str, Any]] = []
    if outcome.changed and not dry_run:
        saved = _save(conn, contract.id, outcome.request, by)
        issued = _issue_account(conn, catalog, account, until=at, now=now, on_issued=on_issued)
        contract = _contracts(conn, account.id)[-1]
    quote = [
        _charge_document(
            _quoted(catalog, account, contract, charge, saved.id),
            contract.timezone,
            contract.id,
            contract.currency,
        )
        for charge in outcome.charges
    ]
    return {
        **_request_document(
            catalog, account, contract, saved, outcome.changed, issued, quote, at, outcome
        ),
        "dry_run": dry_run,
    }


def _save(conn: Conn, contract_id: int, request: Request, by: str) -> Request:
    content = request.content
    values = request.values or (None, None)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO contract_changes (contract_id, kind, requested_at, effect, term, plan,"
            " commitments, end_after, value_before, value_after, requested_by)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s) RETURNING id",
            (
                contract_id,
                request.kind,
                request.at,
                request.effect,
                request.term,
                content.plan if content else None,
                json.dumps(dict(content.commitments)) if content else None,
                request.end_after,
                values[0],
                values[1],
                by,
            ),
        ).fetchone()
    assert row is not None
    return replace(request, id=row["id"])


# --- issuing charges -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Priced:
    """A charge as it is (or would be) stored: with its tax and due date."""

    charge: Charge
    change_id: int | None
    tax_rate: Decimal
    tax: Decimal
    due: date
    credits_applied: Decimal = Decimal(0)
    id: int | None = None


def _quoted(
    catalog: Catalog, account: Account, contract: Contract, charge: Charge, change_id: int
) -> _Priced:
    """P3: taxed alone, at the rate in force on the day its period starts."""
    rate = catalog.tax_table(account.country).rate_on(
        local_date(charge.starts_at, contract.timezone)
    )
    return _Priced(
        charge,
        change_id if charge.request_id is not None else None,
        rate.rate,
        tax_amount(charge.amount, rate.rate, contract.currency, rate.rounding),
        due_date(contract.policy, charge.issued_at, contract.timezone),
    )


def issue(
    connect: Callable[[], Conn],
    catalog: Catalog,
    *,
    until: datetime,
    now: datetime,
    account_ref: str | None = None,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> IssueReport:
    """Issue every charge due up to ``until`` (not after ``now``) for one account or all.

    A naive ``until`` is read in each account's zone ("everything due by 1 November, local
    time"). One transaction per account, under its row lock: a failing account is reported
    and the others go on (the scheduler tries it again at its next run).
    """
    # A naive instant names a range of instants, one per zone: from UTC+14 to UTC-12.
    earliest = until if until.tzinfo else until.replace(tzinfo=UTC) - timedelta(hours=14)
    latest = until if until.tzinfo else until.replace(tzinfo=UTC) + timedelta(hours=12)
    _check_at(earliest, now, "until")
    report = IssueReport(until)
    with connect() as conn:
        with conn.cursor(row_factory=class_row(Account)) as cur:
            accounts = cur.execute(
                "SELECT a.* FROM accounts a WHERE (%(ref)s::text IS NULL OR a.ref = %(ref)s)"
                " AND EXISTS (SELECT 1 FROM contracts c WHERE c.account_id = a.id"
                " AND c.started_at <= %(until)s) ORDER BY a.ref",
                {"ref": account_ref, "until": latest},
            ).fetchall()
            if account_ref is not None and not accounts:
                get_account(conn, account_ref)  # unknown: NotFoundError; known: nothing due
        conn.rollback()
        for account in accounts:
            local_until = until
            if until.tzinfo is None:
                # Where the naive instant is still to come, what is due by now.
                local_until = min(until.replace(tzinfo=zone(account.timezone)), now)
            try:
                with conn.transaction():
                    report.issued.extend(
                        _issue_account(
                            conn, catalog, account, until=local_until, now=now, on_issued=on_issued
                        )
                    )
                report.accounts += 1
            except Exception as exc:  # one account's failure must not stop the others
                if isinstance(exc, psycopg.OperationalError):
                    raise
                message = f"{type(exc).__name__}: {exc}".strip()[:2000]
                report.failed[account.ref] = message
                log.error(
                    "issuing charges of account %r failed (will retry): %s", account.ref, message
                )
    return report


def _issue_account(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    *,
    until: datetime,
    now: datetime,
    on_issued: Callable[[Conn, int], None] | None = None,
) -> list[dict[str, Any]]:
    """The account's charges due by ``until`` not issued yet, inserted, taxed and paid by
    points under the account's lock; their documents, oldest first."""
    _lock(conn, account)
    issued: list[dict[str, Any]] = []
    for contract in _contracts(conn, account.id):
        if contract.started_at > until:
            continue
        sim = _replay(catalog, contract, until)
        due = [c for c in sim.charges if c.issued_at <= until]
        if due:
            for priced in _insert(conn, catalog, account, contract, due, now):
                if on_issued is not None and priced.id is not None:
                    on_issued(conn, priced.id)
                issued.append(
                    _charge_document(priced, contract.timezone, contract.id, contract.currency)
                )
        _follow_plan(conn, account, contract, sim)
    return issued


def _insert(
    conn: Conn,
    catalog: Catalog,
    account: Account,
    contract: Contract,
    due: Sequence[Charge],
    now: datetime,
) -> list[_Priced]:
    with conn.cursor(row_factory=dict_row) as cur:
        have = {
            r["key"]
            for r in cur.execute(
                "SELECT key FROM charges WHERE contract_id = %s AND key = ANY(%s)",
                (contract.id, [c.key for c in due]),
            )
        }
    fresh = [
        _quoted(catalog, account, contract, c, c.request_id or 0) for c in due if c.key not in have
    ]
    if not fresh:
        return []
    grants = credits.grants_of(conn, [account.id]).get(account.id, [])
    made: list[_Priced] = []
    for priced in fresh:
        charge = priced.charge
        owed = charge.amount + priced.tax
        uses: list[tuple[int, int]] = []
        if owed > 0:
            # P4 as at a close: grants that exist now and expire on or after the issue day.
            day = local_date(charge.issued_at, contract.timezone)
            uses = credits.plan_use(credits.points_of(owed, contract.currency), grants, day, now)
        applied = credits.money_of(sum(p for _, p in uses), contract.currency)
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                _INSERT_CHARGE,
                {
                    "account_id": account.id,
                    "contract_id": contract.id,
                    "change_id": priced.change_id,
                    "key": charge.key,
                    "kind": charge.kind,
                    "plan": charge.plan,
                    "term": charge.term,
                    "description": charge.description,
                    "period_start": charge.starts_at,
                    "period_end": charge.ends_at,
                    "part": charge.part,
                    "whole": charge.whole,
                    "unit": charge.unit,
                    "currency": contract.currency,
                    "amount": charge.amount,
                    "tax_rate": priced.tax_rate,
                    "tax": priced.tax,
                    "credits_applied": applied,
                    "amount_due": owed - applied,
                    "issued_at": charge.issued_at,
                    "due_date": priced.due,
                    "issued_by": _ISSUER,
                },
            ).fetchone()
        if row is None:
            continue  # issued meanwhile: the unique key waited for the other issuer
        if uses:
            _record_uses(conn, account.id, row["id"], uses, now)
            taken = dict(uses)
            grants = [
                credits.Grant(
                    g.id, g.points, g.remaining - taken.get(g.id, 0), g.granted_at, g.expires_on
                )
                for g in grants
            ]
        made.append(
            _Priced(
                charge,
                priced.change_id,
                priced.tax_rate,
                priced.tax,
                priced.due,
                applied,
                row["id"],
            )
        )
    return made


_INSERT_CHARGE: Final = """
INSERT INTO charges (account_id, contract_id, change_id, key, kind, plan, term, description,
    period_start, period_end, part, whole, unit, currency, amount, tax_rate, tax,
    credits_applied, amount_due, issued_at, due_date, issued_by)
VALUES (%(account_id)s, %(contract_id)s, %(change_id)s, %(key)s, %(kind)s, %(plan)s, %(term)s,
    %(description)s, %(period_start)s, %(period_end)s, %(part)s, %(whole)s, %(unit)s,
    %(currency)s, %(amount)s, %(tax_rate)s, %(tax)s, %(credits_applied)s, %(amount_due)s,
    %(issued_at)s, %(due_date)s, %(issued_by)s)
-- Idempotent: a second issuer of the same charge waits for the first, then inserts nothing.
ON CONFLICT (contract_id, key) DO NOTHING
RETURNING id
"""


def _record_uses(
    conn: Conn, account_id: int, charge_id: int, uses: Sequence[tuple[int, int]], at: datetime
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO credit_ledger (account_id, kind, points, entry_at, grant_id, charge_id)"
            " VALUES (%s, 'use', %s, %s, %s, %s)",
            [(account_id, -points, at, grant_id, charge_id) for grant_id, points in uses],
        )


def _follow_plan(conn: Conn, account: Account, contract: Contract, sim: Simulation) -> None:
    """The account's plan follows its contract's: each plan change that has taken effect is
    recorded in the plan history (SPEC P6) once."""
    previous: str | None = None
    for request in contract.requests:
        if request.content is None or request.id not in sim.effective:
            continue
        plan = request.content.plan
        if previous is not None and plan != previous:
            follow_contract(
                conn, account.id, plan, sim.effective[request.id], f"contract:{request.id}"
            )
        previous = plan


def in_force(conn: Conn, catalog: Catalog, account: Account, at: datetime) -> bool:
    """Whether the account has a contract started by ``at`` and not ended by then (the free
    period counts: the service runs from the purchase)."""
    found = _contracts(conn, account.id)
    if not found or found[-1].started_at > at:
        return False
    return _replay(catalog, found[-1], at).ended_at is None


def spans(
    conn: Conn, catalog: Catalog, account_id: int, now: datetime
) -> list[tuple[datetime, datetime | None]]:
    """When each of the account's contracts ran, as known at ``now``: from its start to its
    end (None: still running). For checks of many past instants at once (import)."""
    return [(c.started_at, _replay(catalog, c, now).ended_at) for c in _contracts(conn, account_id)]


# --- the month's statement -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MonthTerms:
    """What a contract makes of a month's statement (metering.statements prices it)."""

    #: The contract's plan at the month's first instant; None when no term had begun by then
    #: (the month's plan is then the account's, SPEC P6).
    plan: str | None
    #: Committed devices per class, billed in advance: the month bills the peak above them.
    commitments: dict[str, int]


def month_terms(
    conn: Conn, catalog: Catalog, accounts: Sequence[Account], start: datetime, end: datetime
) -> dict[int, MonthTerms]:
    """For each account with a contract in force at some instant of ``[start, end)``: the plan
    and the committed devices its statement is priced with. Its fee and commitments are paid
    by charges, so such a month has no base fee line (metering.pricing.price_month).

    The commitments that count are the ones paid for during the month: calendar, those in
    force at its first instant (an increase is charged from the next 1st, a free period pays
    for none); anniversary, the largest in force at any instant of it (each was paid for,
    pro rata, from the instant it took effect).
    """
    found: dict[int, MonthTerms] = {}
    # One query for the whole close: most accounts have no contract and cost nothing more.
    with conn.cursor(row_factory=dict_row) as cur:
        holders = {
            r["account_id"]
            for r in cur.execute(
                "SELECT DISTINCT account_id FROM contracts"
                " WHERE account_id = ANY(%s::bigint[]) AND started_at < %s",
                ([a.id for a in accounts], end),
            )
        }
    for account in accounts:
        if account.id not in holders:
            continue
        plan: str | None = None
        committed: dict[str, int] = {}
        in_force = False
        for contract in _contracts(conn, account.id):
            if contract.started_at >= end:
                continue
            whole = _replay(catalog, contract, end)
            if whole.ended_at is not None and whole.ended_at <= start:
                continue
            in_force = True
            contents = _contents_in(catalog, contract, start, end)
            if contents.at_start is not None:
                plan = contents.at_start.plan
            for content in contents.paid:
                for device_class, count in content.commitments:
                    committed[device_class] = max(committed.get(device_class, 0), count)
        if in_force:
            found[account.id] = MonthTerms(plan, committed)
    return found


@dataclass(frozen=True, slots=True)
class _MonthContents:
    at_start: Content | None
    paid: tuple[Content, ...]


def _contents_in(
    catalog: Catalog, contract: Contract, start: datetime, end: datetime
) -> _MonthContents:
    if contract.started_at <= start:
        sim = _replay(catalog, contract, start)
        running = sim.ended_at is None
    else:
        # Started within the month: from its start (an anniversary term begins at once).
        sim = Simulation(
            contract.policy,
            contract.timezone,
            contract.currency,
            _pricer(catalog),
            contract.requests[0],
        )
        running = False
    at_start = sim.content if running else None
    if contract.policy == "calendar":
        return _MonthContents(at_start, (sim.content,) if running and sim.begun else ())
    paid = [sim.content] if running or sim.begun else []
    last = end - timedelta(microseconds=1)
    for request in contract.requests[1:]:
        if start < request.at < end:
            sim.advance(request.at)
            if sim.ended_at is None:
                paid.append(sim.content)
                sim.apply(request)
                paid.append(sim.content)
    sim.advance(last)
    if sim.ended_at is None:
        paid.append(sim.content)
    return _MonthContents(at_start, tuple(paid))


# --- reading ---------------------------------------------------------------------------------


def list_charges(conn: Conn, account: Account) -> list[dict[str, Any]]:
    """Every charge issued to the account, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT c.*, k.timezone FROM charges c JOIN contracts k ON k.id = c.contract_id"
            " WHERE c.account_id = %s ORDER BY c.issued_at, c.id",
            (account.id,),
        ).fetchall()
    return [_stored_document(row) for row in rows]


def _stored_document(row: Mapping[str, Any]) -> dict[str, Any]:
    charge = Charge(
        key=row["key"],
        kind=row["kind"],
        starts_at=row["period_start"],
        ends_at=row["period_end"],
        issued_at=row["issued_at"],
        amount=row["amount"],
        request_id=row["change_id"],
        plan=row["plan"],
        term=row["term"],
        description=row["description"],
        part=row["part"],
        whole=row["whole"],
        unit=row["unit"],
    )
    priced = _Priced(
        charge,
        row["change_id"],
        row["tax_rate"],
        row["tax"],
        row["due_date"],
        row["credits_applied"],
        row["id"],
    )
    return _charge_document(priced, row["timezone"], row["contract_id"], row["currency"])


def _charge_document(priced: _Priced, tz: str, contract_id: int, money: str) -> dict[str, Any]:
    c = priced.charge
    total = c.amount + priced.tax
    return {
        "id": priced.id,
        "contract": contract_id,
        "kind": c.kind,
        "description": c.description,
        "plan": c.plan,
        "term": c.term,
        "period_start": local_date(c.starts_at, tz),
        "period_end": last_day(c.starts_at, c.ends_at, tz),
        "starts_at": _iso(c.starts_at, tz),
        "ends_at": _iso(c.ends_at, tz),
        "share": (
            {"part": c.part, "whole": c.whole, "unit": c.unit} if c.unit is not None else None
        ),
        "currency": money,
        "amount": format_money(c.amount, money),
        "tax_rate": str(priced.tax_rate),
        "tax": format_money(priced.tax, money),
        "total": format_money(total, money),
        "credits_applied": format_money(priced.credits_applied, money),
        "amount_due": format_money(total - priced.credits_applied, money),
        "issued_at": _iso(c.issued_at, tz),
        "issued_on": local_date(c.issued_at, tz),
        "due_date": priced.due,
        "change": priced.change_id,
    }


def show(conn: Conn, catalog: Catalog, account: Account, *, at: datetime) -> dict[str, Any]:
    """The account's contract as of ``at``: its term, renewal, deadline, what waits."""
    at = at.astimezone(UTC)
    contracts = [c for c in _contracts(conn, account.id) if c.started_at <= at]
    if not contracts:
        return {
            "account": account.ref,
            "contract": None,
            "status": "none",
            "at": _iso(at, account.timezone),
        }
    contract = contracts[-1]
    return _contract_document(catalog, account, contract, _replay(catalog, contract, at), at)


def _contract_document(
    catalog: Catalog, account: Account, contract: Contract, sim: Simulation, at: datetime
) -> dict[str, Any]:
    tz = contract.timezone
    settled = sim.settle()
    ended = sim.ended_at is not None and sim.ended_at <= at
    term = sim.terms[-1] if ended and sim.terms else sim.term
    ends_at = sim.ended_at if ended else settled.ended_at
    continues = not ended and (ends_at is None or ends_at > term.ends_at)
    pending = [p.request for p in sim.pending]
    waiting_cancel = any(r.kind == "cancel" for r in pending)
    if ended:
        status = "ended"
    elif not sim.begun:
        status = "free_period"
    elif waiting_cancel:
        status = "ending"
    else:
        status = "active"
    if contract.policy == "calendar":
        cutoff = deadline(term.starts_at, term.ends_at, tz)
    else:
        cutoff = term.ends_at
    fee = term.fee if sim.begun or ended else _pricer(catalog)(sim.content, sim.length)
    next_term = None
    if not ended:
        # The term after this one, if the contract runs on into it.
        twin = sim.fork()
        if not twin.begun:
            twin.advance(term.starts_at)
        twin.advance(twin.term.ends_at)
        if twin.ended_at is None:
            nt = twin.term
            next_term = {
                "term": nt.length,
                "start": local_date(nt.starts_at, tz),
                "end": last_day(nt.starts_at, nt.ends_at, tz),
                "starts_at": _iso(nt.starts_at, tz),
                "ends_at": _iso(nt.ends_at, tz),
                "plan": nt.content.plan,
                "commitments": dict(nt.content.commitments),
                "fee": format_money(nt.fee, contract.currency),
            }
    next_invoice: datetime | None = None
    if not sim.begun and not ended:
        next_invoice = term.starts_at
    elif continues:
        next_invoice = term.ends_at
    free = None
    if contract.policy == "calendar":
        free = {
            "start": local_date(contract.started_at, tz),
            "end": last_day(contract.started_at, sim.free_until or contract.started_at, tz),
        }
    return {
        "account": account.ref,
        "contract": contract.id,
        "status": status,
        "policy": contract.policy,
        "currency": contract.currency,
        "timezone": tz,
        "at": _iso(at, tz),
        "started_at": _iso(contract.started_at, tz),
        "free_period": free,
        "plan": sim.content.plan,
        "commitments": dict(sim.content.commitments),
        "term": term.length,
        "term_start": local_date(term.starts_at, tz),
        "term_end": last_day(term.starts_at, term.ends_at, tz),
        "term_starts_at": _iso(term.starts_at, tz),
        "term_ends_at": _iso(term.ends_at, tz),
        "term_fee": format_money(fee, contract.currency),
        "renews_at": _iso(term.ends_at, tz) if continues else None,
        "next_invoice_at": _iso(next_invoice, tz) if next_invoice else None,
        "next_invoice_on": local_date(next_invoice, tz) if next_invoice else None,
        "cancellation_deadline": (cutoff - timedelta(microseconds=1)).astimezone(zone(tz)).date()
        if not ended
        else None,
        "cancellation_deadline_at": _iso(cutoff, tz) if not ended else None,
        "ends_at": _iso(ends_at, tz) if ends_at else None,
        "last_day": local_date(ends_at, tz) - timedelta(days=1) if ends_at else None,
        "next_term": next_term,
        "scheduled_changes": [
            _change_document(r, settled.effective.get(r.id), tz) for r in pending
        ],
        "requests": [
            _change_document(r, sim.effective.get(r.id) or settled.effective.get(r.id), tz)
            for r in contract.requests
            if r.at <= at
        ],
    }


def _change_document(request: Request, effective: datetime | None, tz: str) -> dict[str, Any]:
    content = request.content
    return {
        "id": request.id,
        "kind": request.kind,
        "requested_at": _iso(request.at, tz),
        "effect": request.effect,
        "effective_at": _iso(effective, tz) if effective else None,
        "effective_on": local_date(effective, tz) if effective else None,
        "term": request.term,
        "plan": content.plan if content else None,
        "commitments": dict(content.commitments) if content else None,
        "end_after": f"{request.end_after:%Y-%m}" if request.end_after else None,
    }


def _request_document(
    catalog: Catalog,
    account: Account,
    contract: Contract,
    request: Request,
    changed: bool,
    issued: list[dict[str, Any]],
    quote: list[dict[str, Any]],
    at: datetime,
    outcome: Outcome | None = None,
) -> dict[str, Any]:
    sim = _replay(catalog, contract, at)
    effective = outcome.effective_at if outcome else sim.effective.get(request.id)
    return {
        "account": account.ref,
        "changed": changed,
        "request": _change_document(request, effective, contract.timezone),
        "charges": quote,
        "issued": issued,
        "contract": _contract_document(catalog, account, contract, sim, at),
    }


def _iso(at: datetime, tz: str) -> str:
    """An instant in the account's zone, as the seeds read it; UTC as ``Z``."""
    text = at.astimezone(zone(tz)).isoformat()
    return text.replace("+00:00", "Z") if tz in ("UTC", "Etc/UTC") else text
