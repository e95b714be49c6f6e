"""Monthly peaks for many accounts at once, computed in NumPy over one binary COPY (M1-M3, M6).

The month close's path. PostgreSQL's window functions (``metering.peak_sql``) take about a
microsecond per row per sort and window pass, four passes in all; here PostgreSQL only streams
four fixed-width columns per event, which NumPy reads in place and sorts on integer keys.

Devices travel once, as a dictionary (the ``devices`` rows of the accounts, with a 64-bit hash
of each id seeded by its account, since ids repeat across accounts); events carry that hash
instead of the id. Should two devices of the accounts share a hash, or an event name a device
the dictionary lacks, this answer would be wrong: ``peaks_many`` then logs why and asks the SQL
path instead.

The same rules as ``metering.peak.compute_peaks``, held to it by tests/integration/test_peak_sql.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.rows import tuple_row

from metering.peak import ClassPeak
from metering.peak_sql import sql_peaks_many

log = logging.getLogger(__name__)

# PostgreSQL's binary timestamptz: microseconds since 2000-01-01 UTC.
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"

# One row of the COPY below: a field count, then each field as a length and big-endian bytes.
_ROW: Final = np.dtype(
    [
        ("fields", ">i2"),
        ("len_device", ">i4"),
        ("device", ">i8"),
        ("len_time", ">i4"),
        ("time", ">i8"),
        ("len_id", ">i4"),
        ("id", ">i8"),
        ("len_active", ">i4"),
        ("active", "u1"),
    ]
)

_DEVICES: Final = """
SELECT id, account_id, device_class, hashtextextended(id, account_id) AS hash
FROM devices WHERE account_id = ANY(%(account_ids)s::bigint[])
ORDER BY hash
"""

# `time < end` only: history before the month gives each device's state when it starts (M2).
# Public for bench/close.py, which times it alone.
EVENTS_COPY: Final = """
COPY (
    SELECT hashtextextended(device_id, account_id), time, id, state = 'active'
    FROM device_state_events
    WHERE account_id = ANY(%(account_ids)s::bigint[]) AND time < %(end)s::timestamptz
) TO STDOUT (FORMAT binary)
"""

# The close's COPY (close_peaks): for accounts whose last close left a usable snapshot of the
# devices Active at this month's start, that snapshot (as events just before the start) and
# the month's own events; for the others, their history as above.
SNAPSHOT_EVENTS_COPY: Final = """
COPY (
    SELECT hashtextextended(device_id, account_id), %(before)s::timestamptz, 0::bigint, true
    FROM device_month_states
    WHERE account_id = ANY(%(snapshot_ids)s::bigint[]) AND boundary = %(start)s
    UNION ALL
    SELECT hashtextextended(device_id, account_id), time, id, state = 'active'
    FROM device_state_events
    WHERE account_id = ANY(%(snapshot_ids)s::bigint[])
      AND time >= %(start)s AND time < %(end)s
    UNION ALL
    SELECT hashtextextended(device_id, account_id), time, id, state = 'active'
    FROM device_state_events
    WHERE account_id = ANY(%(history_ids)s::bigint[]) AND time < %(end)s
) TO STDOUT (FORMAT binary)
"""

# A snapshot is usable unless an event before its boundary was stored after it was taken:
# noted by the late-event trigger, or stored while that close was committing (the trigger could
# not see its statement yet), found through the received_at index around the snapshot's time.
_USABLE_SNAPSHOTS: Final = """
WITH snaps AS (
    SELECT account_id, taken_at FROM month_snapshots
    WHERE account_id = ANY(%(account_ids)s::bigint[]) AND boundary = %(start)s
), racing AS (
    SELECT DISTINCT e.account_id
    FROM device_state_events e JOIN snaps s USING (account_id)
    WHERE e.received_at BETWEEN (SELECT min(taken_at) FROM snaps) - %(margin)s
                            AND (SELECT max(taken_at) FROM snaps) + %(margin)s
      AND e.received_at BETWEEN s.taken_at - %(margin)s AND s.taken_at + %(margin)s
      AND e.time < %(start)s
)
SELECT s.account_id FROM snaps s
WHERE s.account_id NOT IN (SELECT account_id FROM racing)
  AND NOT EXISTS (
      SELECT 1 FROM late_events x
      WHERE x.account_id = s.account_id AND x.event_time < %(start)s
        AND x.received_at > s.taken_at - %(margin)s
  )
"""
#: As metering.statements.LATE_MARGIN: a transaction may commit this long after it began.
SNAPSHOT_MARGIN: Final = timedelta(hours=1)

#: Per account, the devices Active at the end of the period (id, class): the next snapshot.
EndStates = dict[int, list[tuple[str, str]]]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class Unusable(Exception):
    """The events cannot be read this way (see the module); the SQL path still can."""


def peaks_many(
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
    try:
        return frame_peaks_many(conn, account_ids, start, end, distinct=distinct)
    except Unusable as exc:
        log.warning("peaks of %d account(s) computed in SQL instead: %s", len(account_ids), exc)
        return sql_peaks_many(conn, account_ids, start, end, distinct=distinct)


def peaks(
    conn: psycopg.Connection[Any],
    account_id: int,
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> dict[str, ClassPeak]:
    """One account's peaks per class over ``[start, end)``."""
    return peaks_many(conn, [account_id], start, end, distinct=distinct)[account_id]


def frame_peaks_many(
    conn: psycopg.Connection[Any],
    account_ids: Sequence[int],
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> dict[int, dict[str, ClassPeak]]:
    """``peaks_many`` in NumPy; raises ``Unusable`` where that would be wrong."""
    return _frame(conn, account_ids, start, end, distinct=distinct, snapshots=False)[0]


def close_peaks(
    conn: psycopg.Connection[Any],
    account_ids: Sequence[int],
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> tuple[dict[int, dict[str, ClassPeak]], EndStates]:
    """The close's peaks, as ``peaks_many``'s, and the devices Active at ``end`` per account.

    Where the previous close left a usable snapshot of the devices Active at ``start``, only
    the month's events are read: the close then costs the month, not the account's history.
    """
    try:
        return _frame(conn, account_ids, start, end, distinct=distinct, snapshots=True)
    except Unusable as exc:
        log.warning("peaks of %d account(s) computed in SQL instead: %s", len(account_ids), exc)
        found = sql_peaks_many(conn, account_ids, start, end, distinct=distinct)
        return found, _sql_end_states(conn, account_ids, end)


_END_STATES: Final = """
SELECT account_id, device_id, device_class FROM (
    SELECT DISTINCT ON (account_id, device_id) account_id, device_id, device_class, state
    FROM device_state_events
    WHERE account_id = ANY(%(account_ids)s::bigint[]) AND time < %(end)s
    ORDER BY account_id, device_id, time DESC, id DESC, state = 'active'
) latest
WHERE state = 'active'
"""


def _sql_end_states(
    conn: psycopg.Connection[Any], account_ids: Sequence[int], end: datetime
) -> EndStates:
    states: EndStates = {a: [] for a in account_ids}
    with conn.cursor(row_factory=tuple_row) as cur:
        for account_id, device_id, device_class in cur.execute(
            _END_STATES, {"account_ids": list(account_ids), "end": end}
        ):
            states[int(account_id)].append((str(device_id), str(device_class)))
    return states


def _frame(
    conn: psycopg.Connection[Any],
    account_ids: Sequence[int],
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str],
    snapshots: bool,
) -> tuple[dict[int, dict[str, ClassPeak]], EndStates]:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    result: dict[int, dict[str, ClassPeak]] = {account_id: {} for account_id in account_ids}
    if not result:
        return result, {}
    params: dict[str, Any] = {"account_ids": list(result), "end": end}
    # One snapshot for the dictionary and the events when this opens the transaction; inside
    # a caller's, a device registered in between only sends the caller to the SQL path.
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        if idle:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        devices = cur.execute(_DEVICES, params).fetchall()
        copy_sql = EVENTS_COPY
        if snapshots:
            usable = {
                int(r[0])
                for r in cur.execute(
                    _USABLE_SNAPSHOTS,
                    {"account_ids": list(result), "start": start, "margin": SNAPSHOT_MARGIN},
                )
            }
            params.update(
                start=start,
                before=start - timedelta(microseconds=1),
                snapshot_ids=sorted(usable),
                history_ids=sorted(set(result) - usable),
            )
            copy_sql = SNAPSHOT_EVENTS_COPY
        data = bytearray()
        with cur.copy(copy_sql, params) as copy:
            for chunk in copy:
                data += chunk
    rows = _parse(data)
    dictionary = _Dictionary(devices)
    device = rows["device"].astype(np.int64)
    time = rows["time"].astype(np.int64)
    order = rows["id"].astype(np.int64)
    active = rows["active"].astype(np.bool_)
    by = replay_order(device, time, order, active)
    peaks = _peaks(
        device=device,
        group_of=dictionary.group_of,
        time=time,
        order=order,
        active=active,
        start=_micros(start),
        distinct=(
            np.fromiter((c in distinct for _, c in dictionary.groups), np.bool_)
            if distinct
            else None
        ),
        by_device=by,
    )
    # Classes in name order, as the pure and SQL paths and stored statements have them.
    for group, peak, peak_at, members in sorted(peaks, key=lambda p: dictionary.groups[p[0]]):
        account_id, device_class = dictionary.groups[group]
        result[account_id][device_class] = ClassPeak(
            device_class,
            peak,
            _PG_EPOCH + timedelta(microseconds=peak_at),
            tuple(sorted(dictionary.ids_of(members))),
        )
    end_states: EndStates = {a: [] for a in result}
    if snapshots and len(device):
        # Each device's last event in replay order says its state at the end.
        last = np.ones(len(by), np.bool_)
        last[:-1] = device[by][1:] != device[by][:-1]
        holding = by[last & active[by]]
        index = dictionary.index(device[holding])
        for i in sorted(index.tolist(), key=lambda k: dictionary.ids[k]):
            account_id, device_class = dictionary.groups[int(dictionary.group[i])]
            end_states[account_id].append((dictionary.ids[i], device_class))
    return result, end_states


def replay_order(device: IntArray, time: IntArray, order: IntArray, active: BoolArray) -> IntArray:
    """Indices of the events by device, then in replay order (time, id, Inactive after
    Active)."""
    return np.lexsort((~active, order, time, device))


def _micros(at: datetime) -> int:
    return (at - _PG_EPOCH) // timedelta(microseconds=1)


def _parse(data: bytearray) -> np.ndarray[Any, np.dtype[np.void]]:
    """The COPY's rows, read in place."""
    if not data.startswith(_SIGNATURE):
        raise Unusable("the COPY stream has no binary signature")
    extension = int.from_bytes(data[15:19], "big")
    offset = 19 + extension
    body = len(data) - offset - 2  # the trailer is a field count of -1
    if body < 0 or body % _ROW.itemsize or data[-2:] != b"\xff\xff":
        raise Unusable("the COPY stream's rows are not of the expected width")
    rows = np.frombuffer(data, dtype=_ROW, count=body // _ROW.itemsize, offset=offset)
    expected = (4, 8, 8, 8, 1)
    actual = ("fields", "len_device", "len_time", "len_id", "len_active")
    if any(bool((rows[name] != value).any()) for name, value in zip(actual, expected, strict=True)):
        raise Unusable("the COPY stream's fields are not of the expected widths")
    return rows


class _Dictionary:
    """The accounts' devices by hash: their ids and (account, class) groups."""

    def __init__(self, devices: list[tuple[Any, ...]]) -> None:
        # Sorted by hash in SQL; a device's index in `ids` is its hash's position here.
        self.ids: list[str] = [d[0] for d in devices]
        self.hashes: IntArray = np.fromiter((d[3] for d in devices), np.int64, len(devices))
        if bool((self.hashes[1:] == self.hashes[:-1]).any()):
            raise Unusable("two devices' ids have the same 64-bit hash")
        if bool((self.hashes[1:] < self.hashes[:-1]).any()):
            raise Unusable("the devices did not come sorted by hash")
        groups: dict[tuple[int, str], int] = {}
        self.group: IntArray = np.fromiter(
            (groups.setdefault((d[1], d[2]), len(groups)) for d in devices),
            np.int64,
            len(devices),
        )
        #: (account id, class) of each group number.
        self.groups = list(groups)

    def index(self, hashes: IntArray) -> IntArray:
        """Each hash's device index."""
        if len(hashes) == 0:
            return np.empty(0, np.int64)
        index = np.searchsorted(self.hashes, hashes)
        found = len(self.hashes) > 0 and bool(
            (self.hashes[np.minimum(index, len(self.hashes) - 1)] == hashes).all()
        )
        if not found:
            raise Unusable("an event names a device that the devices table does not have")
        return index.astype(np.int64)

    def group_of(self, hashes: IntArray) -> IntArray:
        return self.group[self.index(hashes)]

    def ids_of(self, hashes: IntArray) -> list[str]:
        return [self.ids[i] for i in self.index(hashes).tolist()]


def _peaks(
    *,
    device: IntArray,
    group_of: Callable[[IntArray], IntArray],
    time: IntArray,
    order: IntArray,
    active: BoolArray,
    start: int,
    distinct: BoolArray | None = None,
    by_device: IntArray | None = None,
) -> list[tuple[int, int, int, IntArray]]:
    """(group, peak, peak_at, devices at the peak) for every group with an event.

    ``device`` is any integer key of the device; ``group_of`` gives the groups of distinct keys.
    ``distinct`` marks, by group number, the groups counted as distinct devices instead (M6):
    for those the devices are all that were Active in the month (see ``_distinct``).

    The same steps as the SQL path: each event's change to its device's state, then a running
    count per group over instants, counted once an instant is complete (M3).
    """
    if len(device) == 0:
        return []
    # Each device's events in replay order: time, then id (the later-recorded wins, D3), then
    # Inactive after Active only to settle exact duplicates, as compute_peaks does. The close
    # passes the order it also reads the end states from.
    if by_device is None:
        by_device = replay_order(device, time, order, active)
    device, time, active = device[by_device], time[by_device], active[by_device]
    # History at or before the month's start collapses into its first instant.
    instant = np.maximum(time, start)
    first = np.ones(len(device), np.bool_)
    first[1:] = device[1:] != device[:-1]
    # Groups looked up once per device, not per event.
    heads = np.flatnonzero(first)
    group = np.repeat(group_of(device[heads]), np.diff(np.append(heads, len(device))))
    previous = np.zeros(len(device), np.bool_)
    previous[1:] = active[:-1]
    previous[first] = False
    change = active.astype(np.int64) - previous.astype(np.int64)
    # The instant the device's next event takes over; the last event holds to the month's end.
    last = np.ones(len(device), np.bool_)
    last[:-1] = first[1:]
    until = np.empty(len(device), np.int64)
    until[:-1] = instant[1:]
    until[last] = np.iinfo(np.int64).max

    # Running counts per group over instants. An instant's changes telescope, so their order
    # within it does not matter; only rows that change something, and one per device so that
    # a group never Active still has a row.
    keep = (change != 0) | first
    g, t, c = group[keep], instant[keep], change[keep]
    by_instant = np.lexsort((t, g))
    g, t, c = g[by_instant], t[by_instant], c[by_instant]
    running = np.cumsum(c)
    group_start = np.ones(len(g), np.bool_)
    group_start[1:] = g[1:] != g[:-1]
    starts = np.flatnonzero(group_start)
    # The running sum restarts at each group: subtract what the groups before it summed.
    before = running[starts] - c[starts]
    count = running - np.repeat(before, np.diff(np.append(starts, len(g))))
    # A row's count stands only once its instant is complete: the last row of each instant.
    complete = np.ones(len(g), np.bool_)
    complete[:-1] = (g[1:] != g[:-1]) | (t[1:] != t[:-1])
    # Incomplete rows count as 0, which never beats a group's peak (at least 0).
    counted = np.where(complete, count, 0)
    peak = np.maximum.reduceat(counted, starts)
    peak_of_row = np.repeat(peak, np.diff(np.append(starts, len(g))))
    reaching = np.flatnonzero(complete & (counted == peak_of_row) & (peak_of_row > 0))
    # Rows are sorted by instant within a group, so the first reaching row is the first instant.
    reaching_group = g[reaching]
    first_reach = np.ones(len(reaching), np.bool_)
    first_reach[1:] = reaching_group[1:] != reaching_group[:-1]
    peak_at_of_group = np.full(int(group.max()) + 1, start, np.int64)
    peak_at_of_group[reaching_group[first_reach]] = t[reaching[first_reach]]
    peak_of_group = np.zeros(int(group.max()) + 1, np.int64)
    peak_of_group[g[starts]] = peak

    # Evidence: the devices whose event holding at the group's peak instant is Active.
    at = peak_at_of_group[group]
    holding = active & (instant <= at) & (until > at) & (peak_of_group[group] > 0)
    members_group, members = group[holding], device[holding]
    by_group = np.argsort(members_group, kind="stable")
    members_group, members = members_group[by_group], members[by_group]
    bounds = np.searchsorted(members_group, np.arange(len(peak_of_group) + 1))

    result: list[tuple[int, int, int, IntArray]] = []
    for index in g[starts].tolist():
        group_members = members[bounds[index] : bounds[index + 1]]
        # The sweep and the evidence disagreeing would be a bug here: never bill on it.
        if len(group_members) != peak_of_group[index]:
            raise AssertionError(
                f"group {index}: {len(group_members)} devices at a peak of {peak_of_group[index]}"
            )
        result.append(
            (index, int(peak_of_group[index]), int(peak_at_of_group[index]), group_members)
        )
    if distinct is not None and bool(distinct.any()):
        by_distinct = _distinct(device, group, instant, until, active, distinct, start)
        result = [by_distinct.get(r[0], r) for r in result]
    return result


def _distinct(
    device: IntArray,
    group: IntArray,
    instant: IntArray,
    until: IntArray,
    active: BoolArray,
    distinct: BoolArray,
    start: int,
) -> dict[int, tuple[int, int, int, IntArray]]:
    """The distinct groups' counts, from ``_peaks``'s events sorted by device and time.

    As ``metering.peak.distinct_peaks``: a device counts from its first event that says
    Active and holds for some time (one overtaken at its own instant never held, M3); a
    group's ``peak_at`` is the latest of its devices' first instants, else ``start``.
    """
    held = np.flatnonzero(active & (until > instant) & distinct[group])
    # Each device's events run in time order: its first held row is its first Active instant.
    first = np.ones(len(held), np.bool_)
    first[1:] = device[held[1:]] != device[held[:-1]]
    rows = held[first]
    rows = rows[np.argsort(group[rows], kind="stable")]
    groups, members, firsts = group[rows], device[rows], instant[rows]
    result: dict[int, tuple[int, int, int, IntArray]] = {}
    for index in np.unique(group[distinct[group]]).tolist():
        low, high = np.searchsorted(groups, [index, index + 1])
        at = int(firsts[low:high].max()) if high > low else start
        result[index] = (index, int(high - low), at, members[low:high])
    return result
