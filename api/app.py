"""The devmeter web application: the REST API under /v1 and the console under /console."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.middleware.base import RequestResponseEndpoint
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api import docs, metrics, problems
from api.deps import AppState, json_body
from api.routes import (
    account,
    admin,
    billing,
    contracts,
    devices,
    health,
    members,
    rejections,
    usage,
)
from devmeter.config import Settings
from devmeter.db import APPLICATION_NAME
from metering.catalog import load_catalog

DESCRIPTION = """\
Metering of active IoT devices, priced by plan tiers.

Authenticate with `Authorization: Bearer <api key>`. A key belongs to one member of one
account and carries its role (owner, manager, developer). Errors are RFC 9457 problem
details (`application/problem+json`) naming the field at fault. Operator endpoints under
`/v1/admin` take the operator token instead.
"""


def create_app(
    config: Settings | None = None,
    *,
    database_url: str | None = None,
    mqtt_url: str | None = None,
    console: bool = True,
) -> FastAPI:
    config = config or Settings()
    # The service role's (devmeter/config.py), unless the caller already derived it.
    url = database_url or config.service_database_url()
    broker = mqtt_url or config.mqtt_url or config.runtime.get("mqtt_url")
    catalog = load_catalog(config.catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: ConnectionPool[Any] = ConnectionPool(
            url,
            min_size=1,
            max_size=10,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "application_name": APPLICATION_NAME,
                "options": "-c timezone=UTC",
            },
            open=False,
            name="devmeter-api",
            # Fail a request fast (503) rather than hold it while the database is away.
            timeout=5,
        )
        pool.open(wait=False)
        app.state.devmeter = AppState(
            config, catalog, pool, url, broker, metrics.database_registry(pool)
        )
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(
        title="devmeter",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs is served by api.docs from local assets; ReDoc would load from a CDN (blank
        # offline), so it is off.
        docs_url=None,
        redoc_url=None,
        # Any endpoint that reads the database can find it down.
        responses=problems.responses(503),
    )
    problems.install(app)
    docs.install(app)
    app.add_middleware(metrics.Measure)
    if config.env == "production":
        app.middleware("http")(_strict_transport_security)
    # Added last, so outermost: everything inside sees the client's scheme and address. Only
    # the proxies the deployment names are believed; anybody else could claim to be HTTPS.
    # (serve_in_thread turns uvicorn's own copy of this middleware off.)
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config.trusted_proxy_list)
    for module in (
        devices,
        usage,
        rejections,
        members,
        account,
        billing,
        contracts,
        admin,
        health,
    ):
        app.include_router(module.router, dependencies=[Depends(json_body)])
    if console:
        from console.app import mount

        mount(app)
    return app


#: Two years, the value browsers' preload lists ask for; sent only on HTTPS responses (RFC 6797
#: says a browser ignores it over plain HTTP) and only in production, where HTTPS is the rule.
HSTS = "max-age=63072000; includeSubDomains"


async def _strict_transport_security(
    request: Request, call_next: RequestResponseEndpoint
) -> Response:
    response = await call_next(request)
    if request.url.scheme == "https":
        response.headers["Strict-Transport-Security"] = HSTS
    return response


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("devmeter")
    except PackageNotFoundError:
        return "0"
