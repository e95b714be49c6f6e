"""Request-scoped dependencies: a database connection, the caller, the operator check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool

from devmeter.config import Settings
from devmeter.errors import UnauthorizedError, UnsupportedMediaTypeError
from metering.access import Principal, authenticate
from metering.catalog import Catalog

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class AppState:
    config: Settings
    catalog: Catalog
    pool: ConnectionPool[Any]
    database_url: str
    mqtt_url: str | None
    #: Metrics read from this app's database at scrape time (api/metrics.py).
    database_metrics: CollectorRegistry


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in the
# thread pool, and each such hop cost a request more than the dependency's own work.
async def state(request: Request) -> AppState:
    return app_state_of(request)


def app_state_of(request: Request) -> AppState:
    app_state: AppState = request.app.state.devmeter
    return app_state


def db(request: Request) -> Iterator[Conn]:
    """A pooled connection in autocommit mode: writes open their own ``conn.transaction()``,
    so what a handler commits never depends on when FastAPI runs dependency teardown."""
    with app_state_of(request).pool.connection() as conn:
        yield conn


DB = Annotated[Conn, Depends(db)]
State = Annotated[AppState, Depends(state)]


# Declared in the OpenAPI document as security schemes. auto_error off: a missing or malformed
# header gets this API's own 401 problem, not FastAPI's bare 403.
API_KEY = HTTPBearer(
    scheme_name="ApiKey",
    description="A member's API key (`dma_...`), shown once when the member or key is created. "
    "It carries the member's role in one account.",
    auto_error=False,
)
OPERATOR_TOKEN = HTTPBearer(
    scheme_name="OperatorToken",
    description="The operator token of this deployment (`DEVMETER_ADMIN_TOKEN`).",
    auto_error=False,
)
Credentials = HTTPAuthorizationCredentials | None


def principal(conn: DB, credentials: Annotated[Credentials, Security(API_KEY)]) -> Principal:
    # Bearer only: a cookie would make every API POST forgeable cross-site (the console,
    # which does use a cookie, checks a CSRF token on each form instead).
    token = credentials.credentials.strip() if credentials else ""
    if not token:
        raise UnauthorizedError(
            "missing API key: send 'Authorization: Bearer <key>'", field="authorization"
        )
    found = authenticate(conn, token)
    if found is None:
        raise UnauthorizedError("unknown or revoked API key", field="authorization")
    return found


Caller = Annotated[Principal, Depends(principal)]


def allowed(permission: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(caller: Caller) -> Principal:
        caller.require(permission)
        return caller

    return check


async def operator(
    app_state: State, credentials: Annotated[Credentials, Security(OPERATOR_TOKEN)]
) -> None:
    token = credentials.credentials.strip() if credentials else None
    expected = app_state.config.admin_token
    if expected is None:
        raise UnauthorizedError(
            "operator endpoints are disabled: DEVMETER_ADMIN_TOKEN is not set",
            field="authorization",
        )
    if not token or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("missing or wrong operator token", field="authorization")


async def json_body(request: Request) -> None:
    """415 for a body that is not declared JSON, on endpoints that read a JSON body.

    Without this FastAPI reads such a body as bytes and answers 422 "Input should be a valid
    dictionary", which sends the caller looking at the fields instead of the header. A body
    that says JSON but does not parse stays a 422 naming ``body``. Installed on the API's
    routers, ahead of the endpoint's own dependencies; endpoints without a body pass.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None:
        return
    content_type = request.headers.get("content-type")
    if content_type is None:
        # No body at all: let validation say which field is missing.
        if request.headers.get("content-length", "0") == "0" and (
            "transfer-encoding" not in request.headers
        ):
            return
        raise UnsupportedMediaTypeError(
            "send the body as JSON with 'Content-Type: application/json'", field="content-type"
        )
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Type {media!r}: send the body as application/json",
        field="content-type",
    )
