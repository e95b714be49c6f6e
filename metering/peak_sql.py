"""Monthly peaks computed in PostgreSQL over ``device_state_events`` (SPEC M1-M3, M6).

The same rules as ``metering.peak.compute_peaks``, without moving a month of events into
Python: a month close asks for every account of one time zone in one statement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row

from devmeter.db import load_queries
from metering.peak import ClassPeak

Q = load_queries("metering", "peak.sql")

# A month of events is sorted twice: with room in memory the sorts stay quicksorts instead of
# spilling to disk (1M events take about 120 MB). JIT is off because the statement's estimated
# cost makes PostgreSQL compile it with optimisation, which took longer than running it.
_SETTINGS = {"work_mem": "256MB", "jit": "off"}


@dataclass(frozen=True, slots=True)
class _PeakRow:
    account_id: int
    device_class: str
    peak: int
    peak_at: datetime
    device_ids: list[str]


def sql_peaks_many(
    conn: psycopg.Connection[Any],
    account_ids: Sequence[int],
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> dict[int, dict[str, ClassPeak]]:
    """Peaks per class for each account over the shared ``[start, end)``; the classes in
    ``distinct`` counted as distinct devices (M6), as ``compute_peaks`` does.

    Every requested account is a key; one without devices maps to ``{}``.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    result: dict[int, dict[str, ClassPeak]] = {account_id: {} for account_id in account_ids}
    if not result:
        return result
    with _settings(conn, _SETTINGS), conn.cursor(row_factory=class_row(_PeakRow)) as cur:
        rows = cur.execute(
            Q["select_class_peaks"],
            {
                "account_ids": list(result),
                "start": start,
                "end": end,
                "distinct": sorted(distinct),
            },
        ).fetchall()
    for row in rows:
        # Sorted here, not in SQL, so the order is code points whatever the database collation.
        result[row.account_id][row.device_class] = ClassPeak(
            row.device_class, row.peak, row.peak_at, tuple(sorted(row.device_ids))
        )
    return result


def sql_peaks(
    conn: psycopg.Connection[Any],
    account_id: int,
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> dict[str, ClassPeak]:
    """One account's peaks per class over ``[start, end)``."""
    return sql_peaks_many(conn, [account_id], start, end, distinct=distinct)[account_id]


@contextmanager
def _settings(conn: psycopg.Connection[Any], settings: dict[str, str]) -> Iterator[None]:
    """Planner settings for the statements inside, then the caller's settings back.

    Local to a transaction (or to a savepoint, if the caller has a transaction open, so they
    are restored by hand for the rest of it); a failure rolls them back with the savepoint.
    """
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        previous = cur.execute(Q["select_planner_settings"]).fetchone()
        assert previous is not None
        cur.execute(Q["set_local_planner_settings"], settings)
        yield
        cur.execute(Q["set_local_planner_settings"], previous)
