"""Console sessions: an opaque, server-side session per browser sign-in (migration 0011).

The browser's cookie holds a random token, never the API key, and the table holds only the
token's SHA-256 (a 256-bit random value needs no slow hash: metering/secrets.py). A session
is bound to the API key it was opened with and carries that key's member and role, so:

* signing out revokes it server-side: a copy of the cookie stops working at once;
* revoking the API key ends every session opened with it (the lookup joins the live key);
* it ends when unused for ``idle`` and, whatever happens, ``absolute`` after sign-in.

Functions take an open connection and never commit, like the rest of ``metering``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row

from metering.access import Principal
from metering.secrets import digest, new_secret

Conn = psycopg.Connection[Any]

#: A recognisable prefix, so that secret scanners and people can tell a leaked cookie value.
SESSION_PREFIX: Final = "dmc_"
#: last_used_at is rewritten at most this often: a page with several requests costs one write.
_TOUCH_EVERY: Final = timedelta(seconds=60)

_PRINCIPAL_FIELDS: Final = tuple(f.name for f in fields(Principal))

_LOOKUP_SQL: Final = """
SELECT s.id AS session_id, s.last_used_at,
       a.id AS account_id, a.ref AS account_ref, a.name AS account_name,
       a.status AS account_status, a.timezone, a.plan,
       m.id AS member_id, m.name AS member_name, m.role, k.id AS key_id
FROM console_sessions s
JOIN api_keys k ON k.id = s.api_key_id AND k.revoked_at IS NULL
JOIN members m ON m.id = k.member_id
JOIN accounts a ON a.id = k.account_id
WHERE s.token_hash = %(hash)s
  AND s.revoked_at IS NULL
  AND s.expires_at > %(now)s
  AND s.last_used_at > %(idle_since)s
"""


@dataclass(frozen=True, slots=True)
class NewSession:
    id: int
    token: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LiveSession:
    id: int
    principal: Principal


def open_session(
    conn: Conn, principal: Principal, *, now: datetime, absolute: timedelta
) -> NewSession:
    """A new session for the principal's API key; the token is in the result only."""
    token = new_secret(SESSION_PREFIX)
    expires = now + absolute
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO console_sessions (token_hash, api_key_id, created_at, last_used_at,"
            " expires_at) VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (token.digest, principal.key_id, now, now, expires),
        ).fetchone()
    assert row is not None
    # Ended sessions are of no use to anybody after a day: swept here rather than by a job.
    conn.execute(
        "DELETE FROM console_sessions WHERE expires_at < %s OR revoked_at < %s",
        (now - timedelta(days=1), now - timedelta(days=1)),
    )
    return NewSession(int(row["id"]), token.plaintext, expires)


def find_session(conn: Conn, token: str, *, now: datetime, idle: timedelta) -> LiveSession | None:
    """The live session of a cookie's token, or None (unknown, signed out, expired, or its
    API key revoked): the caller signs the browser out without saying which."""
    if not token.startswith(SESSION_PREFIX) or len(token) > 200:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            _LOOKUP_SQL, {"hash": digest(token), "now": now, "idle_since": now - idle}
        ).fetchone()
    if row is None:
        return None
    if row["last_used_at"] <= now - _TOUCH_EVERY:
        conn.execute(
            "UPDATE console_sessions SET last_used_at = %s WHERE id = %s AND last_used_at < %s",
            (now, row["session_id"], now),
        )
    principal = Principal(**{name: row[name] for name in _PRINCIPAL_FIELDS})
    return LiveSession(int(row["session_id"]), principal)


def revoke_session(conn: Conn, token: str, *, now: datetime) -> bool:
    """Sign-out: the session ends server-side; True if a live one was ended."""
    if not token.startswith(SESSION_PREFIX) or len(token) > 200:
        return False
    row = conn.execute(
        "UPDATE console_sessions SET revoked_at = %s"
        " WHERE token_hash = %s AND revoked_at IS NULL RETURNING id",
        (now, digest(token)),
    ).fetchone()
    return row is not None
