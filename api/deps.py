"""Request-scoped dependencies: a database connection, the caller, the operator check."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from devmeter.config import Settings
from devmeter.errors import UnauthorizedError
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


def state(request: Request) -> AppState:
    app_state: AppState = request.app.state.devmeter
    return app_state


def db(request: Request) -> Iterator[Conn]:
    """A pooled connection in autocommit mode: writes open their own ``conn.transaction()``,
    so what a handler commits never depends on when FastAPI runs dependency teardown."""
    with state(request).pool.connection() as conn:
        yield conn


DB = Annotated[Conn, Depends(db)]
State = Annotated[AppState, Depends(state)]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def principal(request: Request, conn: DB) -> Principal:
    # Bearer only: a cookie would make every API POST forgeable cross-site (the console,
    # which does use a cookie, checks a CSRF token on each form instead).
    token = bearer(request)
    if not token:
        raise UnauthorizedError(
            "missing API key: send 'Authorization: Bearer <key>'", field="authorization"
        )
    found = authenticate(conn, token)
    if found is None:
        raise UnauthorizedError("unknown or revoked API key", field="authorization")
    return found


Caller = Annotated[Principal, Depends(principal)]


def allowed(permission: str) -> Callable[[Principal], Principal]:
    def check(caller: Caller) -> Principal:
        caller.require(permission)
        return caller

    return check


def operator(request: Request, app_state: State) -> None:
    token = bearer(request)
    expected = app_state.config.admin_token
    if expected is None:
        raise UnauthorizedError(
            "operator endpoints are disabled: DEVMETER_ADMIN_TOKEN is not set",
            field="authorization",
        )
    if token is None or not hmac.compare_digest(
        token.encode(), expected.get_secret_value().encode()
    ):
        raise UnauthorizedError("missing or wrong operator token", field="authorization")
