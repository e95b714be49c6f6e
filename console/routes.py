"""The console's pages under /console: sign-in, devices, usage with its tier what-if, statements,
the account with its payment method, credit points and plan history (and the owner's forms).

Pages call the same metering functions as the REST API (api/routes), never the API over
HTTP. Every parameter arrives as a plain string and is checked here, so a bad query or form
gets an HTML page rather than the API's JSON 422. Every POST needs the session's CSRF token
(form field or ``X-CSRF-Token`` header); without it the request is refused before anything
is read or written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, cast
from urllib.parse import urlencode

import psycopg
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from psycopg_pool import ConnectionPool

from console import security
from console.security import CsrfError, Secret, Session, SignInRequiredError
from console.views import (
    Chart,
    display_money,
    display_rate,
    local_time,
    month_days,
    month_label,
    next_month,
    previous_month,
    short_day,
    usage_chart,
)
from devmeter.config import Settings
from devmeter.errors import DevmeterError, InvalidError
from ingest.protocol import connection, mosquitto_pub_command
from ingest.rejections import REASON_HELP, REASONS, RejectionFilter, list_rejections
from metering import usage_model
from metering.access import Principal, authenticate, list_members
from metering.accounts import current_payment_method, set_payment_method
from metering.catalog import Catalog, Plan
from metering.credits import Balance, balance, money_of
from metering.daily import DayUsage
from metering.peak import month_bounds
from metering.plans import PlanChange, change_plan, first_month_priced, history
from metering.pricing import format_money, round_money
from metering.registry import (
    DEVICE_ID,
    GATEWAY_CLASS,
    RegisteredDevice,
    device_events,
    get_account,
    get_device,
    heartbeat_hours,
    register_device,
    search_devices,
    set_device_state,
)
from metering.sessions import find_session, open_session, revoke_session
from metering.statements import (
    Usage,
    current_month,
    get_statement,
    get_usage,
    list_statements,
)
from metering.whatif import WhatIf, what_if

log = logging.getLogger("devmeter.console")

Conn = psycopg.Connection[Any]

HERE: Final = Path(__file__).resolve().parent
STATIC_DIR: Final = HERE / "static"
#: The header the console's script sends when it wants a fragment back instead of a page.
FRAGMENT_HEADER: Final = "X-Console-Fragment"
PAGE_SIZE: Final = 25

TEMPLATES: Final = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

router = APIRouter(prefix="/console", include_in_schema=False)


# --- plumbing ----------------------------------------------------------------------------


class _AppState(Protocol):
    """The part of api.deps.AppState the console uses (the console does not import api)."""

    @property
    def config(self) -> Settings: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def pool(self) -> ConnectionPool[Any]: ...


def _app_state(request: Request) -> _AppState:
    return cast(_AppState, request.app.state.devmeter)


def _secret(request: Request) -> Secret:
    fallback: Secret = request.app.state.console_secret
    return security.configured_secret(_app_state(request).config, fallback)


def db(request: Request) -> Iterator[Conn]:
    """A pooled autocommit connection: writes open their own ``conn.transaction()``."""
    with _app_state(request).pool.connection() as conn:
        yield conn


DB = Annotated[Conn, Depends(db)]


def _live_session(request: Request, conn: Conn) -> Session | None:
    token = request.cookies.get(security.COOKIE)
    if not token:
        return None
    config = _app_state(request).config
    found = find_session(
        conn,
        token,
        now=datetime.now(UTC),
        idle=timedelta(minutes=config.console_idle_minutes),
    )
    if found is None:
        return None
    return Session(found.principal, security.csrf_token(_secret(request), token), found.id)


def signed_in(request: Request, conn: DB) -> Session:
    session = _live_session(request, conn)
    if session is None:
        raise SignInRequiredError(clear_cookie=security.COOKIE in request.cookies)
    return session


Signed = Annotated[Session, Depends(signed_in)]


def checked(request: Request, session: Signed, csrf_token: Annotated[str, Form()] = "") -> Session:
    """The session, if the request carries its CSRF token; else CsrfError (403)."""
    sent = request.headers.get(security.CSRF_HEADER) or csrf_token
    if not security.tokens_match(sent, session.csrf_token):
        raise CsrfError
    return session


Checked = Annotated[Session, Depends(checked)]


def wants_fragment(request: Request) -> bool:
    return request.headers.get(FRAGMENT_HEADER) == "row"


def render(
    template: str,
    session: Session | None,
    *,
    status: int = 200,
    section: str = "",
    title: str = "",
    **context: Any,
) -> HTMLResponse:
    principal = session.principal if session else None
    html = TEMPLATES.get_template(template).render(
        session=session,
        principal=principal,
        csrf=session.csrf_token if session else "",
        section=section,
        title=title,
        may_write=bool(principal and principal.may("devices:write")),
        may_statements=bool(principal and principal.may("statements:read")),
        may_usage=bool(principal and principal.may("usage:read")),
        may_account=bool(principal and principal.may("payment_method:read")),
        tz=principal.timezone if principal else "UTC",
        local=local_time,
        money=display_money,
        plain_money=format_money,
        rate=display_rate,
        month_label=month_label,
        short_day=short_day,
        **context,
    )
    return cast(HTMLResponse, security.add_security_headers(HTMLResponse(html, status)))


def redirect(url: str) -> Response:
    return security.add_security_headers(RedirectResponse(url, status_code=303))


def error_page(session: Session | None, status: int, heading: str, message: str) -> HTMLResponse:
    return render(
        "error.html", session, status=status, title=heading, heading=heading, message=message
    )


def forbidden(session: Session, what: str) -> HTMLResponse:
    allowed = {
        "devices:write": "the owner and developers",
        "statements:read": "managers and the owner",
        "usage:read": "managers and the owner",
        "payment_method:read": "managers and the owner",
        "payment_method:write": "the owner",
        "plan:write": "the owner",
    }[what]
    return error_page(
        session,
        403,
        "Not available for your role",
        f"You are signed in as a {session.principal.role}. This page is for {allowed} of "
        f"{session.principal.account_name}.",
    )


# --- exception handlers (installed by console.app.mount) ---------------------------------


async def on_sign_in_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequiredError)
    if wants_fragment(request):
        response: Response = PlainTextResponse("You are signed out: reload the page.", 401)
    else:
        target = security.SIGN_IN_PATH
        if request.method == "GET":
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if here != "/console" and security.safe_console_path(here, "") == here:
                target += "?" + urlencode({"next": here})
        response = RedirectResponse(target, status_code=303)
    if exc.clear_cookie:
        security.clear_session_cookie(response, request)
    return security.add_security_headers(response)


async def on_csrf_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CsrfError)
    message = (
        "This form has expired or did not come from the console, so nothing was changed. "
        "Go back, reload the page and try again."
    )
    if wants_fragment(request):
        return security.add_security_headers(PlainTextResponse(message, 403))
    return error_page(None, 403, "Request refused", message)


# --- sign-in -----------------------------------------------------------------------------


@router.get("")
def home(request: Request) -> Response:
    if security.COOKIE in request.cookies:
        return redirect("/console/devices")
    return redirect(security.SIGN_IN_PATH)


def _sign_in_page(
    request: Request, *, status: int = 200, error: str = "", notice: str = "", next_url: str = ""
) -> Response:
    nonce = request.cookies.get(security.SIGN_IN_COOKIE)
    if not security.valid_nonce(nonce):
        nonce = security.new_nonce()
    assert nonce is not None
    response = render(
        "sign_in.html",
        None,
        status=status,
        title="Sign in",
        sign_in_token=security.sign_in_token(_secret(request), nonce),
        error=error,
        notice=notice,
        next_url=security.safe_console_path(next_url, ""),
    )
    security.set_sign_in_cookie(response, request, nonce)
    return response


@router.get("/sign-in")
def sign_in_form(
    request: Request,
    conn: DB,
    next_url: Annotated[str, Query(alias="next")] = "",
    signed_out: str = "",
) -> Response:
    if _live_session(request, conn) is not None:
        return redirect(security.safe_console_path(next_url, "/console/devices"))
    notice = "You have signed out." if signed_out else ""
    return _sign_in_page(request, notice=notice, next_url=next_url)


@router.post("/sign-in")
def sign_in(
    request: Request,
    conn: DB,
    key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next_url: Annotated[str, Form(alias="next")] = "",
) -> Response:
    nonce = request.cookies.get(security.SIGN_IN_COOKIE)
    if not security.valid_nonce(nonce) or not security.tokens_match(
        csrf_token, security.sign_in_token(_secret(request), nonce or "")
    ):
        return _sign_in_page(
            request,
            status=403,
            error="The sign-in form expired. Please enter your key again.",
            next_url=next_url,
        )
    principal = authenticate(conn, key.strip()) if key.strip() else None
    if principal is None:
        # Never echo the key back, and do not say whether it was unknown or revoked.
        return _sign_in_page(
            request,
            status=401,
            error="That API key is unknown or has been revoked.",
            next_url=next_url,
        )
    log.info(
        "console sign-in: account %s member %s (%s)",
        principal.account_ref,
        principal.member_id,
        principal.role,
    )
    config = _app_state(request).config
    with conn.transaction():
        opened = open_session(
            conn,
            principal,
            now=datetime.now(UTC),
            absolute=timedelta(hours=config.console_session_hours),
        )
    response = redirect(security.safe_console_path(next_url, "/console/devices"))
    # The cookie gets the session's token, never the API key (which the form sent once).
    security.set_session_cookie(response, request, opened.token)
    security.clear_sign_in_cookie(response, request)
    return response


@router.post("/sign-out", dependencies=[Depends(checked)])
def sign_out(request: Request, conn: DB) -> Response:
    # Revoked server-side: the cookie, or any copy of it, no longer signs anybody in.
    with conn.transaction():
        revoke_session(conn, request.cookies.get(security.COOKIE, ""), now=datetime.now(UTC))
    response = redirect(security.SIGN_IN_PATH + "?signed_out=1")
    security.clear_session_cookie(response, request)
    return response


# --- devices -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceFilters:
    q: str
    state: str
    device_class: str
    gateway: str

    def query(self, **extra: str) -> str:
        params = {
            "q": self.q,
            "state": self.state,
            "class": self.device_class,
            "gateway": self.gateway,
            **extra,
        }
        return urlencode({k: v for k, v in params.items() if v})

    @property
    def active(self) -> bool:
        return bool(self.q or self.state or self.device_class or self.gateway)


def _plan(catalog: Catalog, principal: Principal) -> Plan | None:
    return catalog.plans.get(principal.plan)


def _list_url(filters: DeviceFilters, **extra: str) -> str:
    query = filters.query(**extra)
    return "/console/devices" + (f"?{query}" if query else "")


@router.get("/devices")
def devices_page(
    request: Request,
    conn: DB,
    session: Signed,
    q: str = "",
    state: str = "",
    device_class: Annotated[str, Query(alias="class")] = "",
    gateway: str = "",
    after: str = "",
    limit: str = "",
) -> Response:
    principal = session.principal
    filters = DeviceFilters(
        q=q.strip()[:100],
        state=state if state in ("active", "inactive") else "",
        device_class=device_class[:64],
        gateway=gateway if DEVICE_ID.fullmatch(gateway) else "",
    )
    after = after if DEVICE_ID.fullmatch(after) else ""
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    digits = limit.isascii() and limit.isdigit() and len(limit) <= 3
    size = int(limit) if digits and 1 <= int(limit) <= 100 else PAGE_SIZE
    rows = search_devices(
        conn,
        principal.account_id,
        state=filters.state or None,
        device_class=filters.device_class or None,
        gateway_id=filters.gateway or None,
        text=filters.q or None,
        after=after or None,
        limit=size + 1,
    )
    more = len(rows) > size
    rows = rows[:size]
    extra = {"limit": str(size)} if size != PAGE_SIZE else {}
    next_url = (
        "/console/devices?" + filters.query(after=rows[-1].id, **extra) if more and rows else ""
    )
    plan = _plan(_app_state(request).catalog, principal)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return render(
        "devices.html",
        session,
        section="devices",
        title="Devices",
        devices=rows,
        filters=filters,
        classes=sorted(plan.classes) if plan else [],
        next_url=next_url,
        first_url=_list_url(filters, **extra) if after else "",
        return_to=security.safe_console_path(here, "/console/devices"),
    )


_CLASS_COUNTS_SQL: Final = """
SELECT device_class, count(*) AS devices
FROM devices
WHERE account_id = %(account_id)s
GROUP BY device_class
"""


def default_class(conn: Conn, account_id: int, classes: list[str]) -> str:
    """The class the register form starts on: the one the account registers most (ties: by
    name), else the plan's first class that is not a gateway. Gateways are few per fleet, so
    starting on `gateway` because it sorts first registered devices under the wrong class."""
    counts = {
        r["device_class"]: int(r["devices"])
        for r in conn.execute(_CLASS_COUNTS_SQL, {"account_id": account_id}).fetchall()
    }
    used = sorted((c for c in classes if counts.get(c)), key=lambda c: (-counts[c], c))
    if used:
        return used[0]
    others = [c for c in classes if c != GATEWAY_CLASS]
    return (others or classes or [""])[0]


@router.get("/new-device")
def new_device_form(request: Request, conn: DB, session: Signed) -> Response:
    if not session.principal.may("devices:write"):
        return forbidden(session, "devices:write")
    plan = _plan(_app_state(request).catalog, session.principal)
    classes = sorted(plan.classes) if plan else []
    chosen = default_class(conn, session.principal.account_id, classes)
    return _register_page(request, conn, session, values={"device_class": chosen})


def _register_page(
    request: Request,
    conn: Conn,
    session: Session,
    *,
    values: dict[str, str],
    error: str = "",
    error_field: str = "",
    status: int = 200,
) -> Response:
    plan = _plan(_app_state(request).catalog, session.principal)
    # Said before the form is filled in, not only after it is refused (A2).
    needs_payment = bool(
        plan
        and plan.payment_method_required
        and current_payment_method(conn, session.principal.account_id) is None
    )
    return render(
        "device_new.html",
        session,
        status=status,
        section="devices",
        title="Register a device",
        classes=sorted(plan.classes) if plan else [],
        needs_payment=needs_payment,
        values=values,
        error=error,
        error_field=error_field,
    )


_FORM_FIELDS: Final = {"class": "device_class", "id": "device_id"}


@router.post("/devices")
def register(
    request: Request,
    conn: DB,
    session: Checked,
    device_class: Annotated[str, Form(alias="class")] = "",
    device_id: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    gateway_id: Annotated[str, Form()] = "",
) -> Response:
    principal = session.principal
    if not principal.may("devices:write"):
        return forbidden(session, "devices:write")
    values = {
        "device_class": device_class,
        "device_id": device_id,
        "name": name,
        "gateway_id": gateway_id,
    }
    try:
        if not device_class:
            raise InvalidError("choose a device class", field="class")
        with conn.transaction():
            created = register_device(
                conn,
                _app_state(request).catalog,
                account_ref=principal.account_ref,
                device_class=device_class,
                at=datetime.now(UTC),
                device_id=device_id.strip() or None,
                gateway_id=gateway_id.strip() or None,
                name=name.strip() or None,
                source="console",
            )
    except DevmeterError as exc:
        return _register_page(
            request,
            conn,
            session,
            values=values,
            error=exc.message,
            error_field=_FORM_FIELDS.get(exc.field or "", exc.field or ""),
            status=exc.status_code if exc.status_code < 500 else 500,
        )
    # The only response that ever holds the key (D1): rendered here, not behind a redirect,
    # and never cached (render sets Cache-Control: no-store).
    return render(
        "device_created.html",
        session,
        status=201,
        section="devices",
        title="Device registered",
        device=created.device,
        device_key=created.key,
        **_connect_instructions(request, created),
    )


def _connect_instructions(request: Request, registered: RegisteredDevice) -> dict[str, object]:
    """The device's MQTT settings and a ready `mosquitto_pub` line (shown with the key only)."""
    device = registered.device
    mqtt = connection(
        _app_state(request).config.device_mqtt_url(),
        device.account_ref,
        device.id,
        registered.key,
        is_gateway=device.device_class == GATEWAY_CLASS,
    )
    command = mosquitto_pub_command(mqtt) if mqtt["url"] else None
    return {"mqtt": mqtt, "mosquitto_pub": command}


@router.get("/devices/{device_id}")
def device_page(conn: DB, session: Signed, device_id: str) -> Response:
    principal = session.principal
    try:
        with conn.transaction():
            device = get_device(conn, device_id, principal.account_id)
            timeline = device_events(conn, device_id, principal.account_id)
            now = datetime.now(UTC)
            day = heartbeat_hours(
                conn, device_id, principal.account_id, now - timedelta(hours=23), now
            )
    except DevmeterError:
        return error_page(session, 404, "No such device", f"There is no device {device_id!r} here.")
    return render(
        "device.html",
        session,
        section="devices",
        title=f"Device {device.id}",
        device=device,
        timeline=list(reversed(timeline)),
        heartbeats_24h=sum(h.heartbeats for h in day),
        active_24h=sum(h.active for h in day),
        return_to=f"/console/devices/{device.id}",
    )


def _toggle(
    request: Request,
    conn: Conn,
    session: Session,
    device_id: str,
    state: Literal["active", "inactive"],
    return_to: str,
) -> Response:
    principal = session.principal
    fragment = wants_fragment(request)
    if not principal.may("devices:write"):
        if fragment:
            return security.add_security_headers(
                PlainTextResponse(f"A {principal.role} may not change devices.", 403)
            )
        return forbidden(session, "devices:write")
    try:
        with conn.transaction():
            device = set_device_state(
                conn,
                device_id=device_id,
                state=state,
                at=datetime.now(UTC),
                source="console",
                account_id=principal.account_id,
            )
    except DevmeterError as exc:
        status = exc.status_code if exc.status_code < 500 else 500
        message = (
            f"There is no device {device_id!r} here." if exc.status_code == 404 else exc.message
        )
        if fragment:
            return security.add_security_headers(PlainTextResponse(message, status))
        return error_page(session, status, "Could not change the device", message)
    if fragment:
        return render(
            "_device_row.html",
            session,
            d=device,
            return_to=security.safe_console_path(return_to, "/console/devices"),
        )
    return redirect(security.safe_console_path(return_to, f"/console/devices/{device.id}"))


@router.post("/devices/{device_id}/activate")
def activate(
    request: Request,
    conn: DB,
    session: Checked,
    device_id: str,
    return_to: Annotated[str, Form()] = "",
) -> Response:
    return _toggle(request, conn, session, device_id, "active", return_to)


@router.post("/devices/{device_id}/deactivate")
def deactivate(
    request: Request,
    conn: DB,
    session: Checked,
    device_id: str,
    confirm: Annotated[str, Form()] = "",
    return_to: Annotated[str, Form()] = "",
) -> Response:
    if confirm != "yes":
        # The no-script path: a second, explicit "Confirm deactivate" click on its own page.
        try:
            device = get_device(conn, device_id, session.principal.account_id)
        except DevmeterError:
            return error_page(
                session, 404, "No such device", f"There is no device {device_id!r} here."
            )
        return render(
            "confirm_deactivate.html",
            session,
            section="devices",
            title=f"Deactivate {device.id}?",
            device=device,
            return_to=security.safe_console_path(return_to, f"/console/devices/{device.id}"),
        )
    return _toggle(request, conn, session, device_id, "inactive", return_to)


# --- usage and the tier what-if ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassUsageView:
    device_class: str
    #: The quantity billed (final) or billed so far (preliminary).
    peak: int
    peak_at: datetime | None
    #: A closed month recomputed from every event stored now, when that differs (C2).
    corrected: int | None
    amount: Decimal | None
    lines: list[str]
    chart: Chart


@dataclass(frozen=True, slots=True)
class WhatIfView:
    device_class: str
    result: WhatIf


_ACTIVE_NOW_SQL: Final = """
SELECT device_class, count(*) AS active
FROM devices
WHERE account_id = %(account_id)s AND state = 'active'
GROUP BY device_class
"""


def active_now(conn: Conn, account_id: int) -> dict[str, int]:
    """Devices Active now per class: ``devices.state`` follows each device's latest event."""
    rows = conn.execute(_ACTIVE_NOW_SQL, {"account_id": account_id}).fetchall()
    return {r["device_class"]: int(r["active"]) for r in rows}


def _priced_usage(
    conn: Conn, catalog: Catalog, ref: str, month: str, now: datetime
) -> tuple[Usage, str]:
    """The month's usage priced like its statement, and why not if the plan that prices the
    month cannot (it left the catalog, or lacks a class the account used): the quantities
    still show."""
    try:
        return get_usage(conn, catalog, ref, month, now=now, evidence=False), ""
    except InvalidError as exc:
        if exc.field not in ("plan", "device_class"):
            raise
        usage = get_usage(conn, catalog, ref, month, now=now, priced=False, evidence=False)
        return usage, exc.message


def _class_views(
    usage: Usage, days: list[DayUsage], start: datetime, end: datetime, tz: str
) -> list[ClassUsageView]:
    """Per class: the billed peak, its amount and tier lines from the month's own statement
    (the plan in force when the month began, P6), and the corrected peak if late events
    changed it."""
    st = usage.statement
    corrected = usage.corrected or {}
    first_day, n_days = month_days(start, end, tz)
    views = []
    for cls in sorted(set(usage.classes) | set(corrected)):
        billed = usage.classes.get(cls)
        peak, peak_at = (billed.peak, billed.peak_at) if billed else (0, None)
        late = corrected.get(cls)
        fixed = late.peak if late else 0
        # A month under a contract bills the peak above its commitment (issue 12).
        usage_lines = [
            x
            for x in (st.lines if st else ())
            if x.kind in ("usage", "overage") and x.device_class == cls
        ]
        amount = (
            round_money(sum((x.amount for x in usage_lines), Decimal(0)), st.currency)
            if st is not None
            else None
        )
        views.append(
            ClassUsageView(
                cls,
                peak,
                peak_at,
                fixed if usage.corrected is not None and fixed != peak else None,
                amount,
                [f"{x.description} = {display_money(x.amount, st.currency)}" for x in usage_lines]
                if st is not None
                else [],
                usage_chart(cls, days, first_day, n_days, peak, peak_at, tz),
            )
        )
    return views


@router.get("/usage")
def usage_page(request: Request, conn: DB, session: Signed, month: str = "") -> Response:
    principal = session.principal
    if not principal.may("usage:read"):
        return forbidden(session, "usage:read")
    now = datetime.now(UTC)
    current = current_month(principal.timezone, now)
    chosen = month.strip() or current
    catalog = _app_state(request).catalog
    # The plan in force now: next month starts on it, so the what-if compares its tiers.
    plan = _plan(catalog, principal)
    try:
        usage, pricing_error = _priced_usage(conn, catalog, principal.account_ref, chosen, now)
        start, end = month_bounds(chosen, principal.timezone)
        days = usage_model.daily(
            conn, principal.account_id, start, end, principal.timezone, until=now
        )
    except DevmeterError as exc:
        return render(
            "usage.html",
            session,
            status=exc.status_code if exc.status_code < 500 else 500,
            section="usage",
            title="Usage",
            month=chosen if len(chosen) <= 7 else "",
            current=current,
            error=exc.message,
            usage=None,
            statement=None,
            classes=[],
            whatifs=_whatifs(conn, catalog, principal, plan, now),
            currency=plan.currency if plan else "",
            previous_url="",
            next_url="",
        )
    return render(
        "usage.html",
        session,
        section="usage",
        title=f"Usage {chosen}",
        month=chosen,
        current=current,
        error="",
        pricing_error=pricing_error,
        usage=usage,
        statement=usage.statement,
        classes=_class_views(usage, days, start, end, principal.timezone),
        days=days,
        whatifs=_whatifs(conn, catalog, principal, plan, now),
        currency=plan.currency if plan else "",
        previous_url="/console/usage?" + urlencode({"month": previous_month(chosen)}),
        next_url=(
            "/console/usage?" + urlencode({"month": next_month(chosen)}) if chosen < current else ""
        ),
    )


def _whatifs(
    conn: Conn, catalog: Catalog, principal: Principal, plan: Plan | None, now: datetime
) -> list[WhatIfView]:
    if plan is None:
        return []
    from metering.contracts import month_terms

    counts = active_now(conn, principal.account_id)
    # Under a contract next month bills only the devices above its commitments (issue 12).
    following = next_month(current_month(principal.timezone, now))
    start, end = month_bounds(following, principal.timezone)
    account = get_account(conn, principal.account_ref)
    terms = month_terms(conn, catalog, [account], start, end).get(account.id)
    committed = terms.commitments if terms is not None else {}
    return [
        WhatIfView(
            cls,
            what_if(cls, pricing, counts.get(cls, 0), plan.currency, committed.get(cls, 0)),
        )
        for cls, pricing in sorted(plan.classes.items())
    ]


# --- rejected heartbeats ------------------------------------------------------------------


@router.get("/rejections")
def rejections_page(
    conn: DB,
    session: Signed,
    reason: str = "",
    device: str = "",
    after: str = "",
) -> Response:
    """What the ingest worker refused about this account's devices (its publisher still got
    a PUBACK, so this is where a developer finds out). Bad filters are dropped, not refused:
    a hand-edited URL still gets the page."""
    principal = session.principal
    chosen = RejectionFilter(
        reason=reason if reason in REASONS else None,
        device_id=device.strip() if DEVICE_ID.fullmatch(device.strip()) else None,
    )
    params = {"reason": chosen.reason or "", "device": chosen.device_id or ""}
    try:
        page = list_rejections(
            conn, principal.account_id, chosen, cursor=after or None, limit=PAGE_SIZE
        )
    except DevmeterError:
        # A cursor that is not one of ours: start from the newest.
        return redirect(_rejections_url(params))
    return render(
        "rejections.html",
        session,
        section="rejections",
        title="Rejected heartbeats",
        page=page,
        filters=params,
        filtered=bool(chosen.reason or chosen.device_id),
        reasons=REASONS,
        reason_help=REASON_HELP,
        next_url=_rejections_url(params, after=page.next_cursor) if page.next_cursor else "",
        first_url=_rejections_url(params) if after else "",
    )


def _rejections_url(params: dict[str, str], **extra: str) -> str:
    query = urlencode({k: v for k, v in {**params, **extra}.items() if v})
    return "/console/rejections" + (f"?{query}" if query else "")


# --- statements --------------------------------------------------------------------------


@router.get("/statements")
def statements_page(conn: DB, session: Signed) -> Response:
    principal = session.principal
    if not principal.may("statements:read"):
        return forbidden(session, "statements:read")
    now = datetime.now(UTC)
    statements = list_statements(conn, principal.account_ref)
    return render(
        "statements.html",
        session,
        section="statements",
        title="Statements",
        statements=statements,
        current=current_month(principal.timezone, now),
    )


@router.get("/statements/{month}")
def statement_page(request: Request, conn: DB, session: Signed, month: str) -> Response:
    principal = session.principal
    if not principal.may("statements:read"):
        return forbidden(session, "statements:read")
    try:
        statement = get_statement(
            conn,
            _app_state(request).catalog,
            principal.account_ref,
            month,
            now=datetime.now(UTC),
            evidence=False,
        )
    except DevmeterError as exc:
        status = exc.status_code if exc.status_code < 500 else 500
        return error_page(session, status, "No statement", exc.message)
    return render(
        "statement.html",
        session,
        section="statements",
        title=f"Statement {statement.month}",
        statement=statement,
    )


# --- account and payment method ------------------------------------------------------------

#: The kinds of payment method as people read them (A2), in the form's order.
PAYMENT_KIND_NAMES: Final = {
    "card": "Credit card",
    "invoice": "Invoice (accounts in Japan)",
    "convenience_store": "Convenience store",
}


@dataclass(frozen=True, slots=True)
class PlanChangeView:
    change: PlanChange
    #: The first month the plan prices (P6), YYYY-MM.
    bills_from: str
    changed_by: str


def _changed_by(raw: str, names: dict[int, str]) -> str:
    """Who changed a plan, for people: "console:7" and "member:7" (the API) become member 7's
    name and where; "sign-up" and "operator" stay as they are."""
    where, _, member = raw.partition(":")
    if where in ("console", "member") and member.isdigit() and int(member) in names:
        return f"{names[int(member)]} ({'console' if where == 'console' else 'API'})"
    return raw


def _plan_history(conn: Conn, principal: Principal) -> list[PlanChangeView]:
    """The account's plans, newest first."""
    names = {m.id: m.name for m, _ in list_members(conn, principal.account_id)}
    views = []
    for i, change in enumerate(history(conn, principal.account_id)):
        # The sign-up plan also prices the sign-up month, which began before it (metering.plans).
        bills_from = (
            current_month(principal.timezone, change.effective_at)
            if i == 0
            else first_month_priced(change.effective_at, principal.timezone)
        )
        views.append(PlanChangeView(change, bills_from, _changed_by(change.changed_by, names)))
    return views[::-1]


def _credit_balance(conn: Conn, principal: Principal, plan: Plan | None) -> Balance | None:
    """The points and their ledger; None when the plan, hence the currency, is unknown."""
    if plan is None:
        return None
    # A transaction: reading the balance first writes the expiries that are due (P4).
    with conn.transaction():
        account = get_account(conn, principal.account_ref)
        return balance(conn, account, plan.currency, now=datetime.now(UTC))


def _account_page(
    request: Request,
    conn: Conn,
    session: Session,
    *,
    values: dict[str, str] | None = None,
    error: str = "",
    error_field: str = "",
    plan_error: str = "",
    notice: str = "",
    status: int = 200,
) -> Response:
    principal = session.principal
    catalog = _app_state(request).catalog
    plan = _plan(catalog, principal)
    credit = _credit_balance(conn, principal, plan)
    # Only plans in the account's currency: a change to another is refused (metering.plans).
    choices = sorted(
        name for name, p in catalog.plans.items() if plan is None or p.currency == plan.currency
    )
    return render(
        "account.html",
        session,
        status=status,
        section="account",
        title="Account",
        method=current_payment_method(conn, principal.account_id),
        payment_required=bool(plan and plan.payment_method_required),
        may_set_payment=principal.may("payment_method:write"),
        may_set_plan=principal.may("plan:write"),
        kind_names=PAYMENT_KIND_NAMES,
        plan_history=_plan_history(conn, principal),
        plan_choices=choices,
        credit=credit,
        grants={g.id: g for g in credit.grants} if credit else {},
        points_money=money_of,
        values=values or {},
        error=error,
        error_field=error_field,
        plan_error=plan_error,
        notice=notice,
    )


@router.get("/account")
def account_page(
    request: Request,
    conn: DB,
    session: Signed,
    saved: str = "",
    plan_changed: str = "",
    plan_unchanged: str = "",
) -> Response:
    principal = session.principal
    if not principal.may("payment_method:read"):
        return forbidden(session, "payment_method:read")
    notice = ""
    if saved:
        notice = "The payment method is on file."
    elif plan_changed:
        # Said from the history, not from the query string, so a link cannot make it up.
        latest = _plan_history(conn, principal)[0]
        notice = (
            f"The plan is now {latest.change.plan}, in force at once for the service. "
            f"Usage is billed at it from {latest.bills_from}; earlier months keep the plan "
            "they began with."
        )
    elif plan_unchanged:
        notice = f"The account is already on plan {principal.plan}: nothing changed."
    return _account_page(request, conn, session, notice=notice)


@router.post("/account/plan")
def plan_form(
    request: Request,
    conn: DB,
    session: Checked,
    plan: Annotated[str, Form()] = "",
) -> Response:
    principal = session.principal
    if not principal.may("plan:write"):
        return forbidden(session, "plan:write")
    now = datetime.now(UTC)
    try:
        if not plan:
            raise InvalidError("choose a plan", field="plan")
        with conn.transaction():
            result = change_plan(
                conn,
                _app_state(request).catalog,
                get_account(conn, principal.account_ref),
                plan,
                at=now,
                now=now,
                changed_by=f"console:{principal.member_id}",
            )
    except DevmeterError as exc:
        return _account_page(
            request,
            conn,
            session,
            values={"plan": plan},
            plan_error=exc.message,
            status=exc.status_code if exc.status_code < 500 else 500,
        )
    return redirect(f"/console/account?{'plan_changed' if result.changed else 'plan_unchanged'}=1")


@router.post("/account/payment-method")
def payment_method(
    request: Request,
    conn: DB,
    session: Checked,
    kind: Annotated[str, Form()] = "",
    reference: Annotated[str, Form()] = "",
) -> Response:
    principal = session.principal
    if not principal.may("payment_method:write"):
        return forbidden(session, "payment_method:write")
    reference = reference.strip()
    try:
        if not reference:
            raise InvalidError("enter the payment provider's reference", field="reference")
        with conn.transaction():
            set_payment_method(
                conn,
                account_ref=principal.account_ref,
                kind=kind,
                reference=reference,
                at=datetime.now(UTC),
                source="console",
                member_id=principal.member_id,
            )
    except DevmeterError as exc:
        # A refused reference is not echoed back into the form: it may be a card number.
        return _account_page(
            request,
            conn,
            session,
            values={"kind": kind},
            error=exc.message,
            error_field=exc.field or "",
            status=exc.status_code if exc.status_code < 500 else 500,
        )
    return redirect("/console/account?saved=1")


# Last, so that it only catches what nothing above matched (static files are a mount).
@router.get("/{rest:path}")
def not_found(rest: str) -> Response:
    if not rest:
        return redirect("/console")
    return error_page(None, 404, "Page not found", f"There is no console page /{rest}.")
