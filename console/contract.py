"""The console's contract page (issue 12): the contract, its next renewal and cancellation
deadline, what waits for a term's end, the charges; and, for the owner, changes shown with
what they would cost before they are made (a preview is the service's dry run).

Registered ahead of console.routes' router, whose last route is the catch-all 404 page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from console.routes import DB, Checked, Signed, _app_state, forbidden, redirect, render
from console.security import Session
from devmeter.errors import DevmeterError, InvalidError
from metering import contracts
from metering.registry import get_account
from metering.scheduler import charge_outbox

router = APIRouter(prefix="/console", include_in_schema=False)

_DONE = {
    "change": "The change is recorded.",
    "switch-term": "The term switch is recorded.",
    "cancel": "The cancellation is recorded.",
}


async def _commit_fields(request: Request) -> dict[str, str]:
    """The form's ``commit-<class>`` fields (one per class of the plan), as typed."""
    form = await request.form()
    return {
        key.removeprefix("commit-"): str(value).strip()
        for key, value in form.multi_items()
        if key.startswith("commit-") and str(value).strip()
    }


CommitFields = Annotated[dict[str, str], Depends(_commit_fields)]


def _commitments(fields: dict[str, str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for device_class, count in fields.items():
        if not count.isascii() or not count.isdigit():
            raise InvalidError(
                f"committed {device_class} devices: enter a whole number (0 removes them)",
                field="commit",
            )
        found[device_class] = int(count)
    return found


def _page(
    request: Request,
    conn: Any,
    session: Session,
    *,
    quote: dict[str, Any] | None = None,
    asked: str = "",
    values: dict[str, str] | None = None,
    error: str = "",
    notice: str = "",
    status: int = 200,
) -> Response:
    principal = session.principal
    catalog = _app_state(request).catalog
    with conn.transaction():
        account = get_account(conn, principal.account_ref)
        document = contracts.show(conn, catalog, account, at=datetime.now(UTC))
        charges = contracts.list_charges(conn, account)
    plan = catalog.plans.get(document.get("plan") or principal.plan)
    # Plans a change may move to: the same contract policy and currency.
    choices = sorted(
        name
        for name, p in catalog.plans.items()
        if plan is not None
        and p.contract_policy == plan.contract_policy
        and p.currency == plan.currency
    )
    return render(
        "contract.html",
        session,
        status=status,
        section="contract",
        title="Contract",
        contract=document,
        charges=charges[::-1],
        classes=sorted(plan.classes) if plan else [],
        plan_choices=choices,
        may_change=principal.may("plan:write"),
        quote=quote,
        asked=asked,
        values=values or {},
        error=error,
        notice=notice,
        decimal=Decimal,
    )


@router.get("/contract")
def contract_page(request: Request, conn: DB, session: Signed, done: str = "") -> Response:
    if not session.principal.may("statements:read"):
        return forbidden(session, "statements:read")
    return _page(request, conn, session, notice=_DONE.get(done, ""))


@router.post("/contract/{what}")
def contract_form(
    request: Request,
    conn: DB,
    session: Checked,
    fields: CommitFields,
    what: str,
    action: Annotated[str, Form()] = "preview",
    plan: Annotated[str, Form()] = "",
    term: Annotated[str, Form()] = "",
    end_after: Annotated[str, Form()] = "",
) -> Response:
    """``action=preview`` (the default) shows what the request would do and cost, changing
    nothing; ``action=confirm`` makes it."""
    principal = session.principal
    if not principal.may("plan:write") or what not in _DONE:
        return forbidden(session, "plan:write")
    values = {"plan": plan, "term": term, "end_after": end_after}
    values.update({f"commit-{c}": n for c, n in fields.items()})
    now = datetime.now(UTC)
    dry_run = action != "confirm"
    state = _app_state(request)
    catalog = state.catalog
    common: dict[str, Any] = {
        "at": now,
        "now": now,
        "requested_by": f"console:{principal.member_id}",
        "dry_run": dry_run,
        "on_issued": charge_outbox(state.config.webhook_url),
    }
    try:
        with conn.transaction():
            account = get_account(conn, principal.account_ref)
            if what == "change":
                result = contracts.change(
                    conn,
                    catalog,
                    account,
                    plan=plan or None,
                    commitments=_commitments(fields),
                    **common,
                )
            elif what == "switch-term":
                result = contracts.switch_term(conn, catalog, account, term=term, **common)
            else:
                result = contracts.cancel(
                    conn, catalog, account, end_after=end_after or None, **common
                )
    except DevmeterError as exc:
        return _page(
            request,
            conn,
            session,
            asked=what,
            values=values,
            error=exc.message,
            status=exc.status_code if exc.status_code < 500 else 500,
        )
    if dry_run:
        return _page(request, conn, session, quote=result, asked=what, values=values)
    return redirect(f"/console/contract?done={what}")
