"""The signed webhook that pushes each closed statement, and each contract charge (issue 12),
to the billing system (SPEC C3).

An outbox: ``enqueue`` runs inside the account's close transaction, so a delivery row exists
exactly when its statement does; ``deliver_due`` (the scheduler) sends what is due.

Delivery is at least once. A delivery is claimed by moving its ``next_attempt_at`` past the
HTTP timeout (a lease) in a short transaction, then POSTed with no transaction open, then the
outcome is recorded in another short transaction. Holding a row lock across the HTTP call
would pin a connection and a transaction (and its snapshot, which holds back vacuum) for up to
the timeout per delivery; with the lease a crash mid-call only means the lease runs out and the
delivery is sent again. Billing deduplicates resends by the ``Idempotency-Key``, which is the
same for every send of a statement.

What a receiver checks (``verify`` does it): ``X-Devmeter-Signature: t=<unix>,v1=<hex>`` where
hex is HMAC-SHA256(secret, f"{t}." + body). The timestamp is inside the signed material, so a
captured request cannot be replayed after the tolerance has passed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from devmeter.errors import InvalidError, NotFoundError
from metering.export import charge_key, export_charge, export_month, statement_key
from metering.peak import parse_month

log = logging.getLogger("devmeter.webhook")

Conn = psycopg.Connection[Any]

SIGNATURE_HEADER: Final = "X-Devmeter-Signature"
#: Back-off of the first retry; doubled after each failed attempt up to BACKOFF_CAP.
BACKOFF_BASE: Final = timedelta(seconds=30)
BACKOFF_CAP: Final = timedelta(hours=6)
BACKOFF_JITTER: Final = 0.10
#: Added to the HTTP timeout for the lease, to cover building the body and recording the
#: outcome. A socket timeout bounds each read, not the whole response, so a receiver that
#: trickles bytes can outlive the lease; the delivery is then sent twice, which the
#: idempotency key makes harmless.
LEASE_MARGIN: Final = timedelta(seconds=60)
#: Attempt rows keep an error's first characters: enough to diagnose, bounded in size.
_ERROR_CHARS: Final = 500


@dataclass(slots=True)
class DeliveryReport:
    delivered: int = 0
    #: Failed attempts that will be tried again after their back-off.
    retried: int = 0
    #: Deliveries that used their last attempt and will not be tried again.
    failed: int = 0


# --- signing -----------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Devmeter-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and was made within ``tolerance_s``.

    For receivers (and the tests). Never raises on a malformed header: it is simply not a
    valid signature. Several ``v1=`` values are accepted so that a sender can sign with an
    old and a new secret while the secret is rotated.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if not value.isascii() or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2].encode()
    # Every candidate is compared, so the time taken does not tell which one came close.
    matches = [hmac.compare_digest(candidate.encode(), expected) for candidate in candidates]
    return any(matches)


# --- the outbox --------------------------------------------------------------------------


def idempotency_key(account_ref: str, month: str) -> str:
    """One key per statement, whatever the URL and however often it is enqueued or resent."""
    return statement_key(account_ref, month)


_STATEMENT_SQL: Final = """
SELECT a.ref AS account, to_char(s.month, 'YYYY-MM') AS month
FROM statements s JOIN accounts a ON a.id = s.account_id
WHERE s.id = %s
"""

_ENQUEUE_SQL: Final = """
INSERT INTO webhook_deliveries (statement_id, url, idempotency_key)
VALUES (%s, %s, %s)
ON CONFLICT (statement_id, url) DO NOTHING
"""


def enqueue(conn: Conn, statement_id: int, url: str) -> None:
    """Queue the push of a final statement to ``url``; a second enqueue changes nothing.

    Meant for ``close_month(..., on_closed=lambda conn, sid: enqueue(conn, sid, url))``, so it
    commits (or rolls back) with the statement. Due at once.
    """
    _check_url(url)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_STATEMENT_SQL, (statement_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no statement {statement_id}", field="statement_id")
        cur.execute(
            _ENQUEUE_SQL, (statement_id, url, idempotency_key(row["account"], row["month"]))
        )


_CHARGE_SQL: Final = """
SELECT a.ref AS account FROM charges c JOIN accounts a ON a.id = c.account_id WHERE c.id = %s
"""

_ENQUEUE_CHARGE_SQL: Final = """
INSERT INTO webhook_deliveries (charge_id, url, idempotency_key)
VALUES (%s, %s, %s)
ON CONFLICT (charge_id, url) DO NOTHING
"""


def enqueue_charge(conn: Conn, charge_id: int, url: str) -> None:
    """Queue the push of a contract charge, in the transaction that issues it (so a delivery
    exists exactly when the charge does); a second enqueue changes nothing."""
    _check_url(url)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_CHARGE_SQL, (charge_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no charge {charge_id}", field="charge_id")
        cur.execute(_ENQUEUE_CHARGE_SQL, (charge_id, url, charge_key(row["account"], charge_id)))


def _check_url(url: str) -> None:
    # urllib also opens file:// and ftp:// URLs; a statement must only ever go over HTTP(S).
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidError(
            f"webhook URL must be http:// or https:// with a host, not {_redact(url)!r}",
            field="url",
        )


def _redact(url: str) -> str:
    """The URL for a log line: no user:password and no query string, which may hold tokens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# --- delivering --------------------------------------------------------------------------


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> timedelta:
    """Wait after failed attempt number ``attempt`` (1-based): 30 s, 60 s, ... up to 6 h.

    The jitter (±10 %) is applied after the cap, so that deliveries which failed together
    (billing was down) do not all come back in the same second, even at the cap.
    """
    base = min(BACKOFF_BASE * (1 << min(attempt - 1, 30)), BACKOFF_CAP)
    return base * (1 + BACKOFF_JITTER * (2 * rand() - 1))


_CLAIM_SQL: Final = """
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= %(now)s
      AND id <> ALL (%(seen)s::bigint[])
    ORDER BY next_attempt_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d
SET attempts = d.attempts + 1, next_attempt_at = %(lease_until)s
FROM due
WHERE d.id = due.id
RETURNING d.id, d.statement_id, d.charge_id, d.url, d.idempotency_key, d.attempts,
    d.attempts - d.attempts_before_retry AS round_attempt,
    (SELECT to_char(s.month, 'YYYY-MM') FROM statements s WHERE s.id = d.statement_id) AS month
"""

_RECORD_ATTEMPT_SQL: Final = """
INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, error, duration_ms)
VALUES (%s, %s, %s, %s, %s, %s)
"""

# Marked delivered even if another scheduler has taken the delivery over after our lease ran
# out: billing has it, whatever that other send says.
_DELIVERED_SQL: Final = """
UPDATE webhook_deliveries SET status = 'delivered', delivered_at = %s
WHERE id = %s AND status = 'pending'
"""

# A failure only reschedules if no later attempt has claimed the delivery meanwhile (our lease
# ran out): the later attempt owns its schedule.
_RESCHEDULE_SQL: Final = """
UPDATE webhook_deliveries SET next_attempt_at = %s
WHERE id = %s AND status = 'pending' AND attempts = %s
"""

_GIVE_UP_SQL: Final = """
UPDATE webhook_deliveries SET status = 'failed'
WHERE id = %s AND status = 'pending' AND attempts = %s
"""


@dataclass(frozen=True, slots=True)
class _Claim:
    id: int
    #: A delivery carries a closed statement or a contract charge.
    statement_id: int | None
    charge_id: int | None
    url: str
    idempotency_key: str
    attempts: int
    #: The attempt's number since the delivery was enqueued or last retried by an operator.
    round_attempt: int
    month: str | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def deliver_due(
    connect: Callable[[], Conn],
    *,
    secret: bytes,
    now: Callable[[], datetime] | None = None,
    max_attempts: int = 12,
    limit: int = 100,
    timeout_s: float = 10,
) -> DeliveryReport:
    """Send up to ``limit`` due deliveries, one at a time; safe to run in several schedulers.

    2xx is delivered; anything else (an HTTP error status, a refused or dropped connection, a
    timeout, a redirect) is a failed attempt, retried after ``backoff`` until ``max_attempts``
    have failed. Database errors propagate: the lease makes the delivery due again later.
    """
    if not secret:
        raise InvalidError("the webhook secret is empty: refusing to send unsigned statements")
    if max_attempts < 1:
        raise InvalidError("max_attempts must be at least 1", field="max_attempts")
    clock = now or (lambda: datetime.now(UTC))
    lease = timedelta(seconds=timeout_s) + LEASE_MARGIN
    report = DeliveryReport()
    # A delivery retried in this run is not taken again in the same run, even if its
    # back-off has passed meanwhile, so a run always ends.
    seen: list[int] = []
    with connect() as conn:
        while len(seen) < limit:
            started = clock()
            claim = _claim(conn, started, started + lease, seen)
            if claim is None:
                break
            seen.append(claim.id)
            outcome = _attempt(conn, claim, secret, started, timeout_s)
            _record(conn, claim, outcome, started, clock, max_attempts, report)
    return report


def _claim(conn: Conn, at: datetime, lease_until: datetime, seen: list[int]) -> _Claim | None:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            _CLAIM_SQL, {"now": at, "lease_until": lease_until, "seen": seen}
        ).fetchone()
    return None if row is None else _Claim(**row)


def _attempt(conn: Conn, claim: _Claim, secret: bytes, at: datetime, timeout_s: float) -> _Outcome:
    started = time.monotonic()
    try:
        with conn.transaction():
            if claim.charge_id is not None:
                export = export_charge(conn, claim.charge_id)
            else:
                assert claim.month is not None
                export = export_month(conn, claim.month, "jsonl", statement_id=claim.statement_id)
    except Exception as exc:  # a statement that cannot be exported must not stop the others
        if isinstance(exc, psycopg.OperationalError):
            raise
        return _Outcome(None, _error("cannot build the export", exc), _ms_since(started))
    headers = {
        "Content-Type": "application/x-ndjson",
        "Idempotency-Key": claim.idempotency_key,
        SIGNATURE_HEADER: sign(secret, export.body, int(at.timestamp())),
        "X-Devmeter-Export-Id": export.export_id,
        "X-Devmeter-Checksum": f"sha256={export.sha256}",
        "User-Agent": f"devmeter/{_version()}",
    }
    started = time.monotonic()
    try:
        status = _post(claim.url, export.body, headers, timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        return _Outcome(exc.code, _error("HTTP", exc.reason), _ms_since(started))
    except (OSError, http.client.HTTPException, ValueError, InvalidError) as exc:
        # OSError covers refused and reset connections and timeouts (URLError is one too);
        # ValueError and InvalidError an unusable URL. None says the receiver has the statement.
        return _Outcome(None, _error(type(exc).__name__, exc), _ms_since(started))
    return _Outcome(status, None, _ms_since(started))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a 301/302/303 with a GET and no body, whose 2xx would then count as
    # delivered; and a redirect could carry signed statements to another host. A redirect is
    # a failed attempt: the operator fixes the URL.
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    _check_url(url)
    # S310: the scheme was checked just above.
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    with _opener.open(request, timeout=timeout_s) as response:
        # Drain a little of the answer so the server is not reset mid-write; it is not kept.
        response.read(65536)
        return int(response.status)


def _record(
    conn: Conn,
    claim: _Claim,
    outcome: _Outcome,
    attempted_at: datetime,
    clock: Callable[[], datetime],
    max_attempts: int,
    report: DeliveryReport,
) -> None:
    finished = clock()
    retry_at: datetime | None = None
    with conn.transaction():
        conn.execute(
            _RECORD_ATTEMPT_SQL,
            (
                claim.id,
                claim.attempts,
                attempted_at,
                outcome.status_code,
                outcome.error,
                outcome.duration_ms,
            ),
        )
        if outcome.ok:
            conn.execute(_DELIVERED_SQL, (finished, claim.id))
        elif claim.round_attempt >= max_attempts:
            conn.execute(_GIVE_UP_SQL, (claim.id, claim.attempts))
        else:
            retry_at = finished + backoff(claim.round_attempt)
            conn.execute(_RESCHEDULE_SQL, (retry_at, claim.id, claim.attempts))
    what = f"HTTP {outcome.status_code}" if outcome.error is None else outcome.error
    subject = (
        f"statement {claim.statement_id}"
        if claim.statement_id is not None
        else f"charge {claim.charge_id}"
    )
    where = (claim.id, subject, claim.idempotency_key, _redact(claim.url))
    if outcome.ok:
        report.delivered += 1
        log.info(
            "webhook delivery %d (%s, key %s) to %s: delivered on attempt %d (%s)",
            *where,
            claim.round_attempt,
            what,
        )
    elif retry_at is None:
        report.failed += 1
        log.error(
            "webhook delivery %d (%s, key %s) to %s: attempt %d of %d failed (%s); giving up",
            *where,
            claim.round_attempt,
            max_attempts,
            what,
        )
    else:
        report.retried += 1
        log.warning(
            "webhook delivery %d (%s, key %s) to %s: attempt %d of %d failed (%s); retry at %s",
            *where,
            claim.round_attempt,
            max_attempts,
            what,
            retry_at.isoformat(),
        )


def _error(prefix: str, detail: object) -> str:
    return f"{prefix}: {detail}"[:_ERROR_CHARS]


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("devmeter")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


# --- the operator's view -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    account: str
    #: The statement's month, or the month a charge was issued in (account time zone).
    month: str
    idempotency_key: str
    #: The receiver's URL with any credentials or query string left out.
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    #: Set on the delivery of a contract charge (issue 12).
    charge: int | None = None


# A delivery's account and month, whether it carries a statement or a charge.
_SUBJECT: Final = """
LEFT JOIN statements s ON s.id = d.statement_id
LEFT JOIN charges c ON c.id = d.charge_id
JOIN accounts a ON a.id = coalesce(s.account_id, c.account_id)
CROSS JOIN LATERAL (
    SELECT coalesce(s.month, date_trunc('month', c.issued_at AT TIME ZONE a.timezone)::date)
        AS month
) m
"""

_LIST_SQL: Final = (
    """
SELECT d.id, a.ref AS account, to_char(m.month, 'YYYY-MM') AS month, d.idempotency_key,
       d.url, d.status, d.attempts,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       d.delivered_at, w.attempted_at AS last_attempt_at, w.status_code AS last_status_code,
       w.error AS last_error, d.charge_id AS charge
FROM webhook_deliveries d
"""
    + _SUBJECT
    + """
LEFT JOIN LATERAL (
    SELECT attempted_at, status_code, error FROM webhook_attempts
    WHERE delivery_id = d.id ORDER BY attempt DESC LIMIT 1
) w ON true
WHERE (%(status)s::text IS NULL OR d.status = %(status)s)
  AND (%(month)s::date IS NULL OR m.month = %(month)s)
  AND (%(account)s::text IS NULL OR a.ref = %(account)s)
  AND (%(ids)s::bigint[] IS NULL OR d.id = ANY(%(ids)s))
ORDER BY d.id
"""
)

# A new URL is skipped for a statement that already has a delivery to it (one per URL).
_RETRY_SQL: Final = (
    """
UPDATE webhook_deliveries d
SET status = 'pending', next_attempt_at = %(now)s, attempts_before_retry = d.attempts,
    url = coalesce(%(url)s, d.url)
WHERE d.status = 'failed'
  AND d.id IN (
      SELECT d.id FROM webhook_deliveries d
      """
    + _SUBJECT
    + """
      WHERE (%(month)s::date IS NULL OR m.month = %(month)s)
        AND (%(account)s::text IS NULL OR a.ref = %(account)s)
  )
  AND (%(ids)s::bigint[] IS NULL OR d.id = ANY(%(ids)s))
  AND NOT EXISTS (
      SELECT 1 FROM webhook_deliveries o
      WHERE (o.statement_id = d.statement_id OR o.charge_id = d.charge_id)
        AND o.url = %(url)s AND o.id <> d.id
  )
RETURNING d.id
"""
)


def _filters(
    status: str | None, month: str | None, account_ref: str | None, ids: list[int] | None
) -> dict[str, Any]:
    if status is not None and status not in ("pending", "delivered", "failed"):
        raise InvalidError(
            f"unknown delivery status {status!r}: pending, delivered or failed", field="status"
        )
    return {
        "status": status,
        "month": None if month is None else date(*parse_month(month), 1),
        "account": account_ref,
        "ids": ids or None,
    }


def list_deliveries(
    conn: Conn,
    *,
    status: str | None = None,
    month: str | None = None,
    account_ref: str | None = None,
    ids: list[int] | None = None,
) -> list[Delivery]:
    """Deliveries with their latest attempt, oldest first, filtered by what is given."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_LIST_SQL, _filters(status, month, account_ref, ids)).fetchall()
    return [Delivery(**{**row, "url": _redact(row["url"])}) for row in rows]


def retry_failed(
    conn: Conn,
    *,
    now: datetime,
    month: str | None = None,
    account_ref: str | None = None,
    ids: list[int] | None = None,
    url: str | None = None,
) -> list[int]:
    """Make failed deliveries due again at ``now``, each with a fresh allowance of attempts
    (the scheduler sends them on its next run), to ``url`` if given (the receiver moved) or
    else where each was going. Returns the ids made due, in order."""
    if month is None and account_ref is None and not ids:
        raise InvalidError(
            "name what to retry: a month, an account or delivery ids", field="delivery"
        )
    if url is not None:
        _check_url(url)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            _RETRY_SQL, {**_filters(None, month, account_ref, ids), "now": now, "url": url}
        ).fetchall()
    retried = sorted(int(row["id"]) for row in rows)
    for delivery_id in retried:
        log.info("webhook delivery %d: retry requested by an operator", delivery_id)
    return retried
