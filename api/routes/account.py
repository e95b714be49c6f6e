"""The caller's account: its payment method (SPEC A1, A2). Only the owner sets it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import DB, allowed
from api.problems import responses
from api.schemas import PaymentMethodIn, PaymentMethodOut
from devmeter.errors import NotFoundError
from metering.access import Principal
from metering.accounts import PaymentMethod, current_payment_method, set_payment_method

router = APIRouter(prefix="/v1/payment-method", tags=["account"])

Owner = Annotated[Principal, Depends(allowed("payment_method:write"))]
Viewer = Annotated[Principal, Depends(allowed("payment_method:read"))]


def payment_method_out(method: PaymentMethod) -> PaymentMethodOut:
    return PaymentMethodOut(
        account=method.account_ref,
        kind=method.kind,
        reference=method.reference,
        set_at=method.created_at,
        source=method.source,
    )


@router.get(
    "",
    response_model=PaymentMethodOut,
    responses=responses(401, 403, 404),
    summary="The payment method on file (owner and managers)",
)
def read_payment_method(caller: Viewer, conn: DB) -> PaymentMethodOut:
    method = current_payment_method(conn, caller.account_id)
    if method is None:
        raise NotFoundError(
            "no payment method on file: the account owner sets one with PUT /v1/payment-method",
            field="payment_method",
        )
    return payment_method_out(method)


@router.put(
    "",
    response_model=PaymentMethodOut,
    responses=responses(400, 401, 403, 415, 422),
    summary="Set or replace the payment method (owner only); the previous one stays in history",
    description="Send the payment provider's token, never a card number: a reference with 13 "
    "or more digits in a row (spaces or dashes between them allowed) is refused. `invoice` is "
    "for accounts in Japan only. Setting the method already on file changes nothing.",
)
def put_payment_method(body: PaymentMethodIn, caller: Owner, conn: DB) -> PaymentMethodOut:
    with conn.transaction():
        method, _ = set_payment_method(
            conn,
            account_ref=caller.account_ref,
            kind=body.kind,
            reference=body.reference,
            at=datetime.now(UTC),
            source="api",
            member_id=caller.member_id,
        )
    return payment_method_out(method)
