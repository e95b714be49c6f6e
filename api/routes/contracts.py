"""An account's contract and its charges (issue 12): the owner's requests, everyone's reading.

The same requests as ``devmeter contracts`` (metering/contracts.py does the work): the owner
starts, changes, switches and cancels (A1: only the owner changes what the account pays for),
and may ask first what a request would do and cost (``dry_run``); owner and managers read
the contract and the charges. The operator issues charges (back-fill) and reads any account's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from api.deps import DB, State, allowed, operator
from api.problems import responses
from api.schemas import (
    NO_NUL,
    ChargesIssueIn,
    ChargesIssueOut,
    ChargesOut,
    ContractCancelIn,
    ContractChangeIn,
    ContractOut,
    ContractRequestOut,
    ContractStartIn,
    ContractSwitchIn,
    InputInstant,
)
from metering import contracts
from metering.access import Principal
from metering.registry import get_account

router = APIRouter(tags=["contracts"])

Owner = Annotated[Principal, Depends(allowed("plan:write"))]
Reader = Annotated[Principal, Depends(allowed("statements:read"))]
AccountRef = Annotated[str, Path(max_length=63, pattern=NO_NUL)]
Operator = [Depends(operator)]
At = Annotated[
    InputInstant | None,
    Query(description="the contract as of this instant (default: now)"),
]


def _ask(
    conn: Any, app: Any, caller: Principal, request: Callable[..., dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """One request on the caller's contract (metering.contracts), as the CLI makes it."""
    from metering.scheduler import charge_outbox

    now = datetime.now(UTC)
    at = fields.pop("at") or now
    with conn.transaction():
        return request(
            conn,
            app.catalog,
            get_account(conn, caller.account_ref),
            at=at,
            now=now,
            requested_by=f"member:{caller.member_id}",
            on_issued=charge_outbox(app.config.webhook_url),
            **fields,
        )


@router.get(
    "/v1/contract",
    response_model=ContractOut,
    responses=responses(401, 403, 422),
    summary="The contract: term, next renewal, cancellation deadline, scheduled changes "
    "(owner and managers)",
)
def read_contract(caller: Reader, conn: DB, app: State, at: At = None) -> ContractOut:
    with conn.transaction():
        account = get_account(conn, caller.account_ref)
        document = contracts.show(conn, app.catalog, account, at=at or datetime.now(UTC))
    return ContractOut.model_validate(document)


@router.post(
    "/v1/contract",
    status_code=201,
    response_model=ContractRequestOut,
    responses=responses(400, 401, 403, 409, 415, 422),
    summary="Start a contract on the account's plan (owner only)",
)
def start_contract(body: ContractStartIn, caller: Owner, conn: DB, app: State) -> JSONResponse:
    document = _ask(
        conn, app, caller, contracts.start, term=body.term, commitments=body.commitments, at=body.at
    )
    out = ContractRequestOut.model_validate(document)
    return JSONResponse(out.model_dump(mode="json"), status_code=201)


@router.post(
    "/v1/contract/change",
    response_model=ContractRequestOut,
    responses=responses(400, 401, 403, 404, 409, 415, 422),
    summary="Change the plan or committed devices (owner only): an increase at once, charged "
    "pro rata; a decrease at a term's end",
)
def change_contract(
    body: ContractChangeIn, caller: Owner, conn: DB, app: State
) -> ContractRequestOut:
    return ContractRequestOut.model_validate(
        _ask(conn, app, caller, contracts.change, **body.model_dump())
    )


@router.post(
    "/v1/contract/switch-term",
    response_model=ContractRequestOut,
    responses=responses(400, 401, 403, 404, 409, 415, 422),
    summary="Switch between monthly and annual terms (owner only)",
)
def switch_contract_term(
    body: ContractSwitchIn, caller: Owner, conn: DB, app: State
) -> ContractRequestOut:
    return ContractRequestOut.model_validate(
        _ask(conn, app, caller, contracts.switch_term, **body.model_dump())
    )


@router.post(
    "/v1/contract/cancel",
    response_model=ContractRequestOut,
    responses=responses(400, 401, 403, 404, 409, 415, 422),
    summary="Cancel the contract at a term's end (owner only); no refund",
)
def cancel_contract(
    body: ContractCancelIn, caller: Owner, conn: DB, app: State
) -> ContractRequestOut:
    return ContractRequestOut.model_validate(
        _ask(conn, app, caller, contracts.cancel, **body.model_dump())
    )


@router.get(
    "/v1/charges",
    response_model=ChargesOut,
    responses=responses(401, 403, 422),
    summary="Every charge of the account's contracts, oldest first (owner and managers)",
)
def read_charges(caller: Reader, conn: DB) -> ChargesOut:
    with conn.transaction():
        account = get_account(conn, caller.account_ref)
        return ChargesOut.model_validate(
            {"account": account.ref, "charges": contracts.list_charges(conn, account)}
        )


@router.get(
    "/v1/admin/accounts/{ref}/contract",
    response_model=ContractOut,
    responses=responses(401, 404, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="An account's contract (operator)",
)
def operator_contract(ref: AccountRef, conn: DB, app: State, at: At = None) -> ContractOut:
    with conn.transaction():
        account = get_account(conn, ref)
        document = contracts.show(conn, app.catalog, account, at=at or datetime.now(UTC))
    return ContractOut.model_validate(document)


@router.get(
    "/v1/admin/accounts/{ref}/charges",
    response_model=ChargesOut,
    responses=responses(401, 404, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="An account's charges (operator)",
)
def operator_charges(ref: AccountRef, conn: DB) -> ChargesOut:
    with conn.transaction():
        account = get_account(conn, ref)
        return ChargesOut.model_validate(
            {"account": account.ref, "charges": contracts.list_charges(conn, account)}
        )


@router.post(
    "/v1/admin/charges/issue",
    response_model=ChargesIssueOut,
    responses=responses(400, 401, 404, 415, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="Issue every charge due up to an instant (operator; idempotent, for back-fill)",
)
def operator_issue(body: ChargesIssueIn, app: State) -> ChargesIssueOut:
    from devmeter.db import connect
    from metering.scheduler import charge_outbox

    url = app.database_url
    report = contracts.issue(
        lambda: connect(url),
        app.catalog,
        until=body.until,
        now=datetime.now(UTC),
        account_ref=body.account,
        on_issued=charge_outbox(app.config.webhook_url),
    )
    return ChargesIssueOut.model_validate(
        {
            "until": body.until.isoformat(),
            "accounts": report.accounts,
            "issued": report.issued,
            "failed": report.failed,
        }
    )
