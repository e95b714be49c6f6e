"""Writes batches of processed heartbeats: one transaction per batch, COPY then set-based SQL.

The caller acknowledges a batch's MQTT messages only after ``write`` returns: a crash or a
database outage before that loses nothing (the broker redelivers), and a redelivered heartbeat
is stored once (unique index, ``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow, tuple_row

from devmeter.db import load_queries
from ingest.processor import DeviceInfo, DeviceKey, Heartbeat, Rejection

Q = load_queries("ingest")

_STAGE_TYPES = [
    "int4", "timestamptz", "text", "int8", "text", "text", "int8", "text", "timestamptz",
]  # fmt: skip
_REJECTION_TYPES = ["timestamptz", "text", "text", "text", "bytea", "int8", "text"]


@dataclass(frozen=True, slots=True)
class WriteResult:
    heartbeats: int
    duplicates: int
    events: int
    rejections: int


def write_batch(
    conn: psycopg.Connection[Any], heartbeats: Sequence[Heartbeat], rejections: Sequence[Rejection]
) -> WriteResult:
    """Store one batch atomically; returns what was new. Commits (the batch is the unit)."""
    stored = events = 0
    with conn.transaction():
        if heartbeats:
            conn.execute(Q["create_stage"])
            with conn.cursor(row_factory=tuple_row) as cur:
                with cur.copy(Q["copy_stage"]) as copy:
                    copy.set_types(_STAGE_TYPES)
                    for ord_, h in enumerate(heartbeats):
                        copy.write_row(
                            (
                                ord_, h.time, h.device_id, h.account_id, h.device_class,
                                h.state, h.seq, h.reporter, h.received_at,
                            )
                        )  # fmt: skip
                row = cur.execute(Q["apply_stage"]).fetchone()
                assert row is not None
                stored, events, _devices, late_accounts, late_devices, late_times, late_states = row
                if late_devices:
                    cur.execute(
                        Q["insert_successor_events"],
                        {
                            "account_ids": late_accounts,
                            "device_ids": late_devices,
                            "times": late_times,
                            "states": late_states,
                        },
                    )
                    events += cur.rowcount
        if rejections:
            with conn.cursor() as cur, cur.copy(Q["copy_rejections"]) as copy:
                copy.set_types(_REJECTION_TYPES)
                for r in rejections:
                    copy.write_row(
                        (
                            r.received_at, r.topic, r.reason.value, r.detail, r.payload,
                            r.account_id, r.device_id,
                        )
                    )  # fmt: skip
    return WriteResult(stored, len(heartbeats) - stored, events, len(rejections))


def load_directory(conn: psycopg.Connection[Any]) -> dict[DeviceKey, DeviceInfo]:
    """Every device, for the processor. Devices are never deleted, so entries never go stale."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows: list[TupleRow] = cur.execute(Q["select_directory"]).fetchall()
    return directory_entries(rows)


def directory_entries(rows: Sequence[TupleRow]) -> dict[DeviceKey, DeviceInfo]:
    """Directory entries from rows of ``select_directory`` (account ref, id, ...)."""
    return {(r[0], r[1]): DeviceInfo(r[2], r[3], r[4], r[5]) for r in rows}
