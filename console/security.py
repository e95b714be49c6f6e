"""The console's session cookie, CSRF tokens and response headers.

The session is server-side (metering/sessions.py): the cookie holds an opaque random token,
never the API key, in an HttpOnly, SameSite=Strict cookie scoped to /console. Signing out
revokes it in the database, so a copied cookie stops working too; revoking the API key the
session was opened with ends it; it also ends when idle and after a fixed lifetime. The cookie
is Secure when the request came over HTTPS, directly or, from a proxy listed in
DEVMETER_TRUSTED_PROXIES, per its X-Forwarded-Proto (api.app installs that middleware).

CSRF tokens are HMAC-SHA256 over the session token's digest with a server secret, so they are
stateless, differ per session, and cannot be computed by anyone who lacks the secret, even with
a copy of the database. The secret is ``console_secret`` from the settings when the
deployment sets one (needed when several processes serve the console), else random per process:
then a restart just asks people to reload the form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from metering.access import Principal
from metering.secrets import digest

COOKIE: Final = "devmeter_console"
COOKIE_PATH: Final = "/console"
#: Holds the nonce the sign-in form's token is bound to (there is no key yet to bind it to).
SIGN_IN_COOKIE: Final = "devmeter_console_sign_in"
SIGN_IN_PATH: Final = "/console/sign-in"
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"

_CSRF_CONTEXT: Final = b"devmeter-console-csrf\x00"
_SIGN_IN_CONTEXT: Final = b"devmeter-console-sign-in\x00"
_NONCE_LENGTH: Final = 43  # token_urlsafe(32)

#: Every console response carries these. No inline script or style anywhere (the SVG charts
#: use presentation attributes and classes), so 'self' is all the policy needs to allow.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class SignInRequiredError(Exception):
    """No cookie, or a key that no longer authenticates: go to the sign-in page."""

    def __init__(self, *, clear_cookie: bool) -> None:
        super().__init__("sign-in required")
        self.clear_cookie = clear_cookie


class CsrfError(Exception):
    """A state-changing request without this session's token: refused, nothing done."""


@dataclass(frozen=True, slots=True)
class Session:
    """The signed-in person. Deliberately holds no session token, so it can be logged."""

    principal: Principal
    csrf_token: str = field(repr=False)
    session_id: int = 0


@dataclass(frozen=True, slots=True)
class Secret:
    value: bytes = field(repr=False)


def new_process_secret() -> Secret:
    return Secret(secrets.token_bytes(32))


def configured_secret(config: object, fallback: Secret) -> Secret:
    """``config.console_secret`` (a SecretStr) when the settings have one, else ``fallback``."""
    value = getattr(config, "console_secret", None)
    if value is None:
        return fallback
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return Secret(str(text).encode()) if text else fallback


def _mac(secret: Secret, context: bytes, message: bytes) -> str:
    return hmac.new(secret.value, context + message, hashlib.sha256).hexdigest()


def csrf_token(secret: Secret, session_token: str) -> str:
    return _mac(secret, _CSRF_CONTEXT, digest(session_token))


def sign_in_token(secret: Secret, nonce: str) -> str:
    return _mac(secret, _SIGN_IN_CONTEXT, nonce.encode())


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def valid_nonce(value: str | None) -> bool:
    return (
        value is not None
        and len(value) == _NONCE_LENGTH
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    )


def tokens_match(sent: str | None, expected: str) -> bool:
    # Bytes, because compare_digest refuses non-ASCII str and a forged field may be anything.
    return bool(sent) and hmac.compare_digest((sent or "").encode(), expected.encode())


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    # No Max-Age: the browser drops it when it closes; the server ends the session sooner
    # (sign-out, idle, absolute lifetime, the key's revocation).
    response.set_cookie(
        COOKIE,
        token,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=is_https(request)
    )


def set_sign_in_cookie(response: Response, request: Request, nonce: str) -> None:
    response.set_cookie(
        SIGN_IN_COOKIE,
        nonce,
        max_age=3600,
        path=SIGN_IN_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def clear_sign_in_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        SIGN_IN_COOKIE,
        path=SIGN_IN_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def add_security_headers(response: Response, *, cacheable: bool = False) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if not cacheable:
        # Account data (and, once, a device key): not in any cache, not in the back button.
        response.headers["Cache-Control"] = "no-store"
    return response


def safe_console_path(value: str | None, default: str) -> str:
    """``value`` if it is a path inside the console, else ``default``: never an open redirect."""
    if not value or len(value) > 2000:
        return default
    parts = urlsplit(value)
    if (
        parts.scheme
        or parts.netloc
        or not (parts.path == COOKIE_PATH or parts.path.startswith(COOKIE_PATH + "/"))
        or "//" in value
        or "\\" in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
        or parts.path.startswith(SIGN_IN_PATH)
        # Browsers resolve dot segments (also written %2e), which would leave the console.
        or any(segment in (".", "..") for segment in parts.path.split("/"))
        or "%2e" in value.lower()
    ):
        return default
    return value
