"""Idempotency keys of POST requests, as Stripe's API has them (migration 0011).

A client that did not get an answer (a timeout, a dropped connection) sends the same request
again with the same ``Idempotency-Key`` header: it gets the first response and nothing is done
twice. The same key with a different request is a conflict (409), never a silent replay of
something else. Keys are per account and live 24 hours.

The key is claimed in the transaction that does the work, before the work: a concurrent
request with the same key waits on the row's unique key until that transaction ends, then
replays its response (or, if it failed and rolled back, does the work itself). A refused
request therefore leaves no key behind: retrying it runs it again, as Stripe does for requests
that did not start executing.

What is replayed is the stored response body, which the caller chose to store: for a device
registration, everything but the device key, which is shown once and stored only as a hash
(SPEC D1). A client that lost the first response gets the device with ``key: null`` and
rotates the key; the alternative, keeping device keys decryptable with a server secret,
would make the idempotency table a store of live credentials.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from devmeter.errors import ConflictError

Conn = psycopg.Connection[Any]

TTL: Final = timedelta(hours=24)
HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
#: Printable ASCII without spaces, as Stripe allows (a UUID is the usual choice).
KEY_PATTERN: Final = r"^[\x21-\x7e]{1,255}$"

_CLAIM: Final = """
INSERT INTO idempotency_keys (account_id, key, request_hash, created_at, expires_at)
VALUES (%(account_id)s, %(key)s, %(hash)s, %(now)s, %(expires)s)
ON CONFLICT (account_id, key) DO UPDATE
    SET request_hash = EXCLUDED.request_hash, status = NULL, response = NULL,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
    -- An expired key is free again; a live one is left as it is (and locked).
    WHERE idempotency_keys.expires_at <= %(now)s
RETURNING 1 AS claimed
"""


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    body: dict[str, Any]


def request_hash(endpoint: str, payload: dict[str, Any]) -> bytes:
    """What "the same request" means: the endpoint and the validated body, key order aside."""
    text = json.dumps({"endpoint": endpoint, "body": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).digest()


def claim(
    conn: Conn, account_id: int, key: str, fingerprint: bytes, *, now: datetime
) -> Replay | None:
    """None: the key is this transaction's, do the work and `record` it. A Replay: the first
    response to give again. ConflictError: the key was used with another request."""
    # Keys past their day are swept a few at a time here, rather than by a scheduled job.
    conn.execute(
        "DELETE FROM idempotency_keys WHERE ctid IN (SELECT ctid FROM idempotency_keys"
        " WHERE expires_at <= %s LIMIT 100)",
        (now,),
    )
    params = {
        "account_id": account_id,
        "key": key,
        "hash": fingerprint,
        "now": now,
        "expires": now + TTL,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        if cur.execute(_CLAIM, params).fetchone() is not None:
            return None
        row = cur.execute(
            "SELECT request_hash, status, response FROM idempotency_keys"
            " WHERE account_id = %s AND key = %s",
            (account_id, key),
        ).fetchone()
    # A live row was committed by a transaction that claimed it, with its response.
    assert row is not None
    assert row["status"] is not None
    if bytes(row["request_hash"]) != fingerprint:
        raise ConflictError(
            f"{HEADER} {key!r} was already used with a different request; "
            "use a new key for a new request",
            field=HEADER.lower(),
        )
    return Replay(int(row["status"]), dict(row["response"]))


def record(conn: Conn, account_id: int, key: str, status: int, body: dict[str, Any]) -> None:
    """Store the response to replay, in the transaction that claimed the key."""
    conn.execute(
        "UPDATE idempotency_keys SET status = %s, response = %s WHERE account_id = %s AND key = %s",
        (status, Jsonb(body), account_id, key),
    )
