"""Which devices' message counters skipped: the reconciliation behind `devmeter ingest gaps`.

A heartbeat the broker acknowledged but devmeter never stored leaves a hole in its device's
``seq`` numbers. This reads the holes out of what was stored, so a billing operator can see
whether (and for which devices) anything went missing, whatever the cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from devmeter.db import load_queries
from metering.registry import get_account

Q = load_queries("ingest", "gaps.sql")


@dataclass(frozen=True, slots=True)
class SeqGaps:
    device: str
    #: Who numbered the messages: the device itself, or the gateway that reported for it.
    reporter: str
    #: How many seq numbers are missing in all.
    missing: int
    #: Each gap as [first missing, last missing], in seq order.
    gaps: list[list[int]]


def start_of_month(now: datetime) -> datetime:
    """The default window start: the current calendar month, in UTC."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def find_seq_gaps(
    conn: psycopg.Connection[dict[str, object]], account_ref: str, since: datetime
) -> list[SeqGaps]:
    """Devices of ``account_ref`` whose stored seq numbers skip, since ``since``.

    Raises NotFoundError for an unknown account.
    """
    account = get_account(conn, account_ref)
    rows = conn.execute(Q["select_seq_gaps"], {"account_id": account.id, "since": since})
    return [
        SeqGaps(
            device=str(row["device_id"]),
            reporter=str(row["reporter"]),
            missing=int(row["missing"]),  # type: ignore[call-overload]
            gaps=[[int(first), int(last)] for first, last in row["gaps"]],  # type: ignore[attr-defined]
        )
        for row in rows
    ]
