"""``devmeter contracts`` and ``devmeter charges`` (issue 12): requests on an account's
contract and the charges it owes. Registered on ``devmeter.cli.main``; JSON on stdout,
refusals on stderr with exit 2 and nothing changed, as every devmeter command.

Instants are ISO 8601; one without an offset (or a bare date: its midnight) is read in the
account's time zone, as its contract's dates are.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import click

from devmeter.cli import (
    EXIT_FAILED,
    _local_instant,
    _now,
    _parse_instant,
    catalog,
    emit,
    fail,
    reports_errors,
    settings,
    transaction,
)
from devmeter.errors import InvalidError

P = ParamSpec("P")
R = TypeVar("R")

_AT_HELP = (
    "When the request is made (default: now; never in the future). Without an offset it is "
    "read in the account's time zone."
)


def _account() -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--account", "account_ref", required=True, help="Account ref.")


def _at(help_text: str = _AT_HELP) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--at", metavar="ISO", help=help_text)


def _dry_run() -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option(
        "--dry-run",
        is_flag=True,
        help="Say what the request would do and cost (the charges it would make), change nothing.",
    )


def _commit() -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option(
        "--commit",
        "commits",
        metavar="CLASS=N",
        multiple=True,
        help="Committed devices of a class, billed in advance with each term (repeatable; "
        "N=0 removes the class's commitment).",
    )


def _ask(
    account_ref: str, at: str | None, request: Callable[..., dict[str, Any]], **fields: Any
) -> None:
    """One request on the account's contract (metering.contracts), printed as JSON."""
    from metering.registry import get_account
    from metering.scheduler import charge_outbox

    config = settings()
    with transaction(config) as conn:
        account = get_account(conn, account_ref)
        emit(
            request(
                conn,
                catalog(config),
                account,
                at=_local_instant("--at", at, account.timezone),
                now=_now(),
                requested_by="cli",
                on_issued=charge_outbox(config.webhook_url),
                **fields,
            )
        )


def _parse_commits(values: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    for value in values:
        device_class, sep, count = value.partition("=")
        if not sep or not device_class or not count.isascii() or not count.isdigit():
            raise InvalidError(
                f"--commit: expected CLASS=N with N a whole number >= 0, got {value!r}",
                field="commit",
            )
        if device_class in found:
            raise InvalidError(f"--commit: class {device_class!r} given twice", field="commit")
        found[device_class] = int(count)
    return found


@click.group()
def contracts() -> None:
    """Contracts: a recurring fee and committed devices, billed in advance per monthly or
    annual term, renewing by themselves (the plan's contract_policy: calendar or anniversary)."""


@contracts.command("start")
@_account()
@click.option("--term", required=True, type=click.Choice(["monthly", "annual"]))
@_commit()
@_at()
@reports_errors
def contracts_start(account_ref: str, term: str, commits: tuple[str, ...], at: str | None) -> None:
    """Start a contract on the account's plan.

    Calendar plans: free until the month's end, the first term from the 1st after. Anniversary
    plans: the first term from now, charged at once.
    """
    from metering import contracts as service

    _ask(account_ref, at, service.start, term=term, commitments=_parse_commits(commits))


@contracts.command("change")
@_account()
@click.option("--plan", help="The new plan (same currency and contract policy).")
@_commit()
@_at()
@_dry_run()
@reports_errors
def contracts_change(
    account_ref: str, plan: str | None, commits: tuple[str, ...], at: str | None, dry_run: bool
) -> None:
    """Change the plan or committed devices.

    An increase applies at once and is charged pro rata (calendar: whole months from the next
    1st; anniversary: by the second); a decrease waits for a term's end, without refund.
    """
    from metering import contracts as service

    _ask(
        account_ref,
        at,
        service.change,
        plan=plan,
        commitments=_parse_commits(commits),
        dry_run=dry_run,
    )


@contracts.command("switch-term")
@_account()
@click.option("--term", required=True, type=click.Choice(["monthly", "annual"]))
@_at()
@_dry_run()
@reports_errors
def contracts_switch_term(account_ref: str, term: str, at: str | None, dry_run: bool) -> None:
    """Switch between monthly and annual terms.

    Calendar: at the term's end if requested by the 20th of its last month, else one term
    later. Anniversary: a new term starts now (monthly to annual refunds the unused month).
    """
    from metering import contracts as service

    _ask(account_ref, at, service.switch_term, term=term, dry_run=dry_run)


@contracts.command("cancel")
@_account()
@click.option(
    "--end-after",
    metavar="YYYY-MM",
    help="The last month of service: the contract ends with the term in force at its end "
    "(calendar: an annual contract runs its last months as monthly terms). Default: the "
    "earliest term end.",
)
@_at()
@_dry_run()
@reports_errors
def contracts_cancel(
    account_ref: str, end_after: str | None, at: str | None, dry_run: bool
) -> None:
    """Cancel the contract at a term's end (no refund).

    Calendar: requested by the 20th of the term's last month, it ends with that term; later,
    with the next one.
    """
    from metering import contracts as service

    _ask(account_ref, at, service.cancel, end_after=end_after, dry_run=dry_run)


@contracts.command("show")
@_account()
@_at("The contract as of this instant (default: now). Without an offset, in the account's zone.")
@reports_errors
def contracts_show(account_ref: str, at: str | None) -> None:
    """The contract: term, renewal, cancellation deadline, scheduled changes, end."""
    from metering import contracts as service
    from metering.registry import get_account

    config = settings()
    with transaction(config) as conn:
        account = get_account(conn, account_ref)
        emit(
            service.show(
                conn,
                catalog(config),
                account,
                at=_local_instant("--at", at, account.timezone),
            )
        )


@click.group()
def charges() -> None:
    """Charges of contracts: term fees in advance, prorations, refunds."""


@charges.command("list")
@_account()
@reports_errors
def charges_list(account_ref: str) -> None:
    """Every charge issued to the account, oldest first."""
    from metering import contracts as service
    from metering.registry import get_account

    with transaction(settings()) as conn:
        account = get_account(conn, account_ref)
        emit({"account": account.ref, "charges": service.list_charges(conn, account)})


@charges.command("issue")
@click.option(
    "--until",
    metavar="ISO",
    required=True,
    help="Issue every charge due up to this instant (not in the future). Without an offset it "
    "is read in each account's time zone.",
)
@click.option("--account", "account_ref", help="Only this account (default: all).")
@reports_errors
def charges_issue(until: str, account_ref: str | None) -> None:
    """Issue the charges due (what the scheduler does as time passes): idempotent, so for
    back-fill and tests; two issuers of the same charge make one."""
    from devmeter.db import connect
    from metering import contracts as service
    from metering.scheduler import charge_outbox

    config = settings()
    url = config.service_database_url()
    instant = _parse_instant("--until", until)
    naive = datetime.fromisoformat(until).tzinfo is None
    report = service.issue(
        lambda: connect(url),
        catalog(config),
        until=instant.replace(tzinfo=None) if naive else instant,
        now=_now(),
        account_ref=account_ref,
        on_issued=charge_outbox(config.webhook_url),
    )
    emit(
        {
            "until": until,
            "accounts": report.accounts,
            "issued": report.issued,
            "failed": report.failed,
        }
    )
    if report.failed:
        fail(
            f"{len(report.failed)} account(s) failed (retried by the scheduler): "
            f"{', '.join(sorted(report.failed))}",
            EXIT_FAILED,
        )
