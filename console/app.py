"""The developer console: server-rendered pages under /console, in the API's FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from console import contract, routes, security


class _StaticFiles(StaticFiles):
    """Static files with the console's security headers; cacheable, unlike the pages."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        security.add_security_headers(response, cacheable=True)
        return response


def mount(app: FastAPI) -> None:
    """Add the console's routes under /console."""
    # Random per process unless the settings name a console_secret (see console.security).
    app.state.console_secret = security.new_process_secret()
    # The mount first: the router ends with a catch-all 404 page for /console/...
    app.mount("/console/static", _StaticFiles(directory=routes.STATIC_DIR), name="console-static")
    # Ahead of routes.router, which ends with the catch-all 404 page.
    app.include_router(contract.router)
    app.include_router(routes.router)
    app.add_exception_handler(security.SignInRequiredError, routes.on_sign_in_required)
    app.add_exception_handler(security.CsrfError, routes.on_csrf_error)
