"""Plan and credit points of an account (SPEC P4, P6): the owner's view and the operator's.

The owner changes the plan (A1: only the owner); owner and managers read the plan history
and the credit balance. Credit grants are the operator's (SPEC: "operator: credit grants").
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from api.deps import DB, State, allowed, operator
from api.problems import responses
from api.schemas import (
    NO_NUL,
    CreditGrantIn,
    CreditGrantOut,
    CreditsOut,
    PlanChangeIn,
    PlanChangeOut,
    PlanOut,
)
from metering import credits
from metering.access import Principal
from metering.catalog import Catalog
from metering.plans import change_plan, history
from metering.registry import Account, get_account

router = APIRouter(tags=["billing"])

PlanOwner = Annotated[Principal, Depends(allowed("plan:write"))]
BillingReader = Annotated[Principal, Depends(allowed("statements:read"))]
AccountRef = Annotated[str, Path(max_length=63, pattern=NO_NUL)]
Operator = [Depends(operator)]


def _plan_out(conn: DB, account: Account) -> dict[str, Any]:
    return {
        "account": account.ref,
        "plan": account.plan,
        "history": [asdict(h) for h in history(conn, account.id)],
    }


def _change(
    conn: DB, catalog: Catalog, ref: str, body: PlanChangeIn, changed_by: str
) -> PlanChangeOut:
    now = datetime.now(UTC)
    with conn.transaction():
        account = get_account(conn, ref)
        result = change_plan(
            conn, catalog, account, body.plan, at=body.at or now, now=now, changed_by=changed_by
        )
        current = get_account(conn, ref)
        out = _plan_out(conn, current)
    return PlanChangeOut.model_validate(
        {
            **out,
            "previous_plan": result.previous_plan,
            "effective_at": result.effective_at,
            "first_month": result.first_month,
            "changed": result.changed,
        }
    )


def _balance(conn: DB, catalog: Catalog, account: Account) -> dict[str, Any]:
    currency = catalog.plans[account.plan].currency
    return credits.balance_document(credits.balance(conn, account, currency, now=datetime.now(UTC)))


@router.get(
    "/v1/plan",
    response_model=PlanOut,
    responses=responses(401, 403, 422),
    summary="The plan in force and the plan history (owner and managers)",
)
def read_plan(caller: BillingReader, conn: DB) -> PlanOut:
    return PlanOut.model_validate(_plan_out(conn, get_account(conn, caller.account_ref)))


@router.put(
    "/v1/plan",
    response_model=PlanChangeOut,
    responses=responses(400, 401, 403, 409, 415, 422),
    summary="Change the plan (owner only): at once for the service, from the next month for "
    "billing (P6)",
)
def put_plan(body: PlanChangeIn, caller: PlanOwner, conn: DB, app: State) -> PlanChangeOut:
    return _change(conn, app.catalog, caller.account_ref, body, f"member:{caller.member_id}")


@router.get(
    "/v1/credits",
    response_model=CreditsOut,
    responses=responses(401, 403, 422),
    summary="Credit point balance and ledger (owner and managers)",
)
def read_credits(caller: BillingReader, conn: DB, app: State) -> CreditsOut:
    with conn.transaction():
        account = get_account(conn, caller.account_ref)
        return CreditsOut.model_validate(_balance(conn, app.catalog, account))


@router.post(
    "/v1/admin/accounts/{ref}/plan",
    response_model=PlanChangeOut,
    responses=responses(400, 401, 404, 409, 415, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="Change an account's plan (operator)",
)
def operator_plan(ref: AccountRef, body: PlanChangeIn, conn: DB, app: State) -> PlanChangeOut:
    return _change(conn, app.catalog, ref, body, "operator")


@router.get(
    "/v1/admin/accounts/{ref}/credits",
    response_model=CreditsOut,
    responses=responses(401, 404, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="An account's credit balance and ledger (operator)",
)
def operator_credits(ref: AccountRef, conn: DB, app: State) -> CreditsOut:
    with conn.transaction():
        return CreditsOut.model_validate(_balance(conn, app.catalog, get_account(conn, ref)))


@router.post(
    "/v1/admin/accounts/{ref}/credits",
    status_code=201,
    response_model=CreditGrantOut,
    responses=responses(400, 401, 404, 415, 422),
    dependencies=Operator,
    tags=["operator"],
    summary="Grant credit points (operator); at close they pay the amount after tax",
)
def grant_credits(ref: AccountRef, body: CreditGrantIn, conn: DB, app: State) -> JSONResponse:
    now = datetime.now(UTC)
    with conn.transaction():
        account = get_account(conn, ref)
        entry = credits.grant(
            conn,
            account,
            points=body.points,
            reason=body.reason,
            expires_on=body.expires,
            at=body.at or now,
            now=now,
        )
        document = _balance(conn, app.catalog, account)
    out = CreditGrantOut.model_validate({**document, "granted": credits.entry_document(entry)})
    return JSONResponse(out.model_dump(mode="json"), status_code=201)
