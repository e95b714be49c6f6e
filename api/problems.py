"""Errors as RFC 9457 problem details (``application/problem+json``), naming the field at fault.

Every error the API can answer with goes through here, so the body always has the same
shape, and `responses()` declares those same shapes in the OpenAPI document per endpoint.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Final

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import NO_NUL
from devmeter.errors import DevmeterError, UnauthorizedError

log = logging.getLogger("devmeter.api")

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    type: str = Field(default="about:blank", description="always about:blank: see title/status")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what was wrong, for a person")
    field: str | None = Field(default=None, description="the request field at fault, if one")
    errors: list[FieldError] | None = Field(
        default=None, description="every invalid field, for validation errors"
    )


def problem(
    status: int,
    detail: str,
    *,
    field: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        title=HTTPStatus(status).phrase, status=status, detail=detail, field=field, errors=errors
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


_DESCRIPTIONS: Final = {
    400: "Malformed request (a body that cannot be read, e.g. not UTF-8)",
    401: "Missing, unknown or revoked credentials",
    403: "The caller's role may not do this, or the account is suspended",
    404: "No such object in the caller's account",
    409: "Conflicts with the current state",
    415: "The body is not JSON (Content-Type must be application/json)",
    422: "A field is invalid (the problem names it)",
    503: "A dependency (database, broker) is unreachable",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the problem responses an endpoint can give.

    ``model`` puts Problem in the document's components; it also makes FastAPI declare an
    ``application/json`` body that is never sent, which `_problem_media_type_only` removes.
    """
    return {
        code: {
            "description": _DESCRIPTIONS[code],
            "model": Problem,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


def _loc_field(loc: tuple[int | str, ...]) -> str:
    # ("body", "class") -> "class"; ("query", "month") -> "month"; nested keep their path.
    # A body that is not JSON at all comes as ("body", <offset>): the field is the body.
    if len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int):
        return "body"
    # Header names are case-insensitive: lower case, as "authorization" and "content-type".
    if len(loc) == 2 and loc[0] == "header":
        return str(loc[1]).lower()
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in ("body", "query", "path", "header")
        else [str(p) for p in loc]
    )
    return ".".join(parts) or str(loc[0] if loc else "request")


def _problem_media_type_only(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        if PROBLEM_MEDIA_TYPE in content:
                            content.pop("application/json", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _message(error: Any) -> str:
    if (
        error.get("type") == "string_pattern_mismatch"
        and error.get("ctx", {}).get("pattern") == NO_NUL
    ):
        return "must not contain NUL (U+0000)"
    return str(error.get("msg", "invalid"))


def install(app: FastAPI) -> None:
    _problem_media_type_only(app)

    @app.exception_handler(DevmeterError)
    async def _devmeter_error(_: Request, exc: DevmeterError) -> JSONResponse:
        status = exc.status_code
        if status >= 500:
            log.error("server error: %s", exc.message)
            return problem(500, "internal error; see the server log")
        headers = (
            {"WWW-Authenticate": 'Bearer realm="devmeter"'}
            if isinstance(exc, UnauthorizedError)
            else None
        )
        return problem(status, exc.message, field=exc.field, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            FieldError(field=_loc_field(tuple(e.get("loc", ()))), message=_message(e))
            for e in exc.errors()
        ]
        first = errors[0] if errors else FieldError(field="request", message="invalid request")
        return problem(422, f"{first.field}: {first.message}", field=first.field, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        # Not the caller's fault and usually brief: say so, and when to try again.
        log.warning("database unavailable: %s", type(exc).__name__)
        return problem(
            503, "the database is unavailable; try again shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem(500, "internal error; see the server log")
