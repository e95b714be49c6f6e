"""The quarantine read back: which heartbeats were refused, and why (issue 9, part 6).

Integrators otherwise see nothing when a payload is refused: the publisher still gets its
PUBACK (docs/protocol.md, "What is refused"). ``list_rejections`` serves GET /v1/rejections,
``devmeter rejections list`` and the console's page; ``count_by_reason`` serves /metrics.

An account sees only rows whose ``account_id`` is its own: the writer sets it when the topic
names a registered device (ingest/processor.py). Rows with no account (unknown topics and
devices) belong to the operator and are listed only when asked for by name, ``UNATTRIBUTED``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import psycopg

from devmeter.db import load_queries
from devmeter.errors import InvalidError
from ingest.processor import QUARANTINE_PAYLOAD_BYTES, Reason

Q = load_queries("ingest", "rejections.sql")

Conn = psycopg.Connection[Any]

#: The operator's scope: rejections about no registered device. Never an account's.
UNATTRIBUTED: Final = "unattributed"
#: The operator's view of every rejection, whoever it is about (the CLI's default).
EVERY: Final = "all"
Scope = int | Literal["unattributed", "all"]

MAX_LIMIT: Final = 500
DEFAULT_LIMIT: Final = 50
#: The per-reason summary counts at most this many of the newest rows in the window, so that
#: a fleet refused millions of times does not make every page slow.
SUMMARY_CAP: Final = 10_000

REASONS: Final = tuple(r.value for r in Reason)

#: What each reason means, for people (the console); the same words as docs/protocol.md.
REASON_HELP: Final[dict[str, str]] = {
    Reason.BAD_TOPIC: "the topic is not a device or gateway heartbeat topic",
    Reason.PAYLOAD_TOO_LARGE: "the payload is over 64 KiB",
    Reason.MALFORMED_JSON: "the payload is not JSON",
    Reason.SCHEMA: "a field is missing, extra or of the wrong type; ts without an offset or "
    "before 2000; a child listed twice",
    Reason.TOO_MANY_CHILDREN: "a gateway lists more than 1,000 devices",
    Reason.UNKNOWN_DEVICE: "the device (or a listed child) is not registered",
    Reason.NOT_A_GATEWAY: "a gateway topic names a device whose class is not gateway",
    Reason.NOT_BOUND: "a listed child is not bound to that gateway",
    Reason.TS_IN_FUTURE: "ts is more than 5 minutes after the worker received the message",
    Reason.BEFORE_REGISTRATION: "ts is before the device was registered",
}

PayloadEncoding = Literal["utf-8", "base64"]


@dataclass(frozen=True, slots=True)
class Rejected:
    """One refused message as shown to people and programs."""

    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    device_id: str | None
    #: The stored payload: its text when it is UTF-8, else base64 (``payload_encoding``).
    payload: str
    payload_encoding: PayloadEncoding
    #: How many bytes were stored (at most 4 KiB).
    payload_bytes: int
    #: The stored payload is the full 4 KiB: the message was at least that long, and anything
    #: beyond was cut (one of exactly 4,096 bytes reads true too: the length was not kept).
    payload_truncated: bool


@dataclass(frozen=True, slots=True)
class RejectionFilter:
    reason: str | None = None
    device_id: str | None = None
    #: Received at or after (inclusive).
    since: datetime | None = None
    #: Received before (exclusive).
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RejectionPage:
    items: list[Rejected]
    next_cursor: str | None
    #: Rejections per reason in the window (device, since, until; whatever the reason filter).
    summary: dict[str, int] = field(default_factory=dict)
    #: False when the window holds more than SUMMARY_CAP rows: the summary counts the newest.
    summary_complete: bool = True


def payload_view(raw: bytes) -> tuple[str, PayloadEncoding, bool]:
    """(text or base64, which, truncated). A payload cut at 4 KiB may end inside a UTF-8
    character: up to three trailing bytes are then dropped rather than the whole shown as
    base64 (the truncated flag already says the end is missing)."""
    truncated = len(raw) >= QUARANTINE_PAYLOAD_BYTES
    for cut in range(4 if truncated else 1):
        try:
            return raw[: len(raw) - cut].decode("utf-8"), "utf-8", truncated
        except UnicodeDecodeError:
            continue
    return base64.b64encode(raw).decode("ascii"), "base64", truncated


def encode_cursor(row: Rejected) -> str:
    text = f"{row.received_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        at, _, row_id = text.partition("|")
        after = datetime.fromisoformat(at), int(row_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = None
    if after is None or after[0].tzinfo is None:
        raise InvalidError("invalid cursor: pass next_cursor back unchanged", field="cursor")
    return after


def check_filter(filters: RejectionFilter) -> None:
    """InvalidError (422) naming the field: the API validates first, the CLI relies on this."""
    if filters.reason is not None and filters.reason not in REASONS:
        raise InvalidError(
            f"unknown reason {filters.reason!r}: one of {', '.join(REASONS)}", field="reason"
        )
    if filters.device_id is not None and (
        "\x00" in filters.device_id or not 0 < len(filters.device_id) <= 64
    ):
        raise InvalidError("device_id must be 1 to 64 characters, without NUL", field="device_id")
    for name in ("since", "until"):
        value: datetime | None = getattr(filters, name)
        if value is not None and value.utcoffset() is None:
            raise InvalidError(f"{name} must carry a UTC offset (e.g. Z)", field=name)
    if filters.since is not None and filters.until is not None and filters.until <= filters.since:
        raise InvalidError("until must be after since", field="until")


def list_rejections(
    conn: Conn,
    scope: Scope,
    filters: RejectionFilter = RejectionFilter(),
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
    summary: bool = True,
) -> RejectionPage:
    """One page of ``scope``'s rejections, newest first (keyset paging on (received_at, id):
    stable while new rejections arrive, no OFFSET scan). ``scope`` is an account id, or
    UNATTRIBUTED for the operator's rows."""
    check_filter(filters)
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidError(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    if scope in (UNATTRIBUTED, EVERY) and filters.device_id is not None:
        raise InvalidError(
            "a device id names a device only within an account: give the account too",
            field="device_id",
        )
    after_at, after_id = decode_cursor(cursor) if cursor else (None, None)
    params: dict[str, object] = {
        "account_id": scope if isinstance(scope, int) else None,
        "reason": filters.reason,
        "device_id": filters.device_id,
        "since": filters.since,
        "until": filters.until,
        "after_at": after_at,
        "after_id": after_id,
        "limit": limit + 1,
        "cap": SUMMARY_CAP,
    }
    which = scope if isinstance(scope, str) else "account"
    rows = conn.execute(Q[f"select_{which}_rejections"], params).fetchall()
    items = [_rejected(r) for r in rows[:limit]]
    page = RejectionPage(items, encode_cursor(items[-1]) if len(rows) > limit and items else None)
    if not summary:
        return page
    counts = conn.execute(Q[f"count_{which}_rejections_by_reason"], params).fetchall()
    per_reason = {str(r["reason"]): int(r["rejections"]) for r in counts if r["rejections"]}
    return RejectionPage(
        page.items,
        page.next_cursor,
        dict(sorted(per_reason.items())),
        not any(r["beyond"] for r in counts),
    )


def _rejected(row: dict[str, Any]) -> Rejected:
    raw = bytes(row["payload"])
    text, encoding, truncated = payload_view(raw)
    return Rejected(
        id=int(row["id"]),
        received_at=row["received_at"],
        topic=row["topic"],
        reason=row["reason"],
        detail=row["detail"],
        device_id=row["device_id"],
        payload=text,
        payload_encoding=encoding,
        payload_bytes=len(raw),
        payload_truncated=truncated,
    )


def count_by_reason(conn: Conn) -> dict[str, int]:
    """Every stored rejection per reason (all accounts and none), every known reason present
    (zero included) so that a rate over the counter works from the first rejection."""
    counts = dict.fromkeys(REASONS, 0)
    for row in conn.execute(Q["count_rejections_by_reason"]).fetchall():
        counts[str(row["reason"])] = int(row["rejections"])
    return counts
