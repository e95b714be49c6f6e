"""Errors every layer shares. The API maps ``status_code`` to HTTP; the CLI prints the message."""

from __future__ import annotations


class DevmeterError(Exception):
    """A refusal the caller can act on: its message is one line and names what was wrong."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ConfigError(DevmeterError):
    status_code = 500


class InvalidError(DevmeterError):
    status_code = 422


class NotFoundError(DevmeterError):
    status_code = 404


class ConflictError(DevmeterError):
    status_code = 409


class ForbiddenError(DevmeterError):
    status_code = 403


class UnauthorizedError(DevmeterError):
    """No credentials, or credentials that match nothing (or were revoked)."""

    status_code = 401


class UnsupportedMediaTypeError(DevmeterError):
    """A request body in a format the endpoint does not read (it reads JSON)."""

    status_code = 415
