"""Usage as a read (issue 11): a month's peaks and daily series from the maintained figures.

Migration 0014 keeps, in the transaction that stores each state event, the net change of the
Active count at every instant (``usage_steps``) and, per quarter hour, the highest count and
the count at its end (``usage_buckets``). A month's peak is then its opening count or its
highest bucket: a few thousand rows, however long the history, where the event replay of
``metering.peak`` reads every event the account ever had. The replay stays the oracle:
tests/integration/test_usage_model.py holds these figures to ``compute_peaks``.

No evidence here: which devices made a peak is answered by the replay, when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

from metering.daily import DayUsage
from metering.peak import ClassPeak

Conn = psycopg.Connection[Any]

_CLASSES: Final = """
SELECT c.device_class, c.first_at, c.days_zone, coalesce(o.count_after, 0) AS opening
FROM usage_classes c
LEFT JOIN LATERAL (
    SELECT b.count_after FROM usage_buckets b
    WHERE b.account_id = c.account_id AND b.device_class = c.device_class
      AND b.bucket < %(start)s
    ORDER BY b.bucket DESC LIMIT 1
) o ON true
WHERE c.account_id = %(account_id)s AND c.first_at < %(end)s
ORDER BY c.device_class
"""

# Per class and local day of the period: the highest bucket (first in time on a tie) and the
# count at the day's last step. A month is some 90 rows, whatever the number of devices.
_DAYS: Final = """
SELECT device_class,
       (bucket AT TIME ZONE %(tz)s)::date AS day,
       max(max_count) AS max_count,
       (array_agg(max_at ORDER BY max_count DESC, bucket))[1] AS max_at,
       (array_agg(count_after ORDER BY bucket DESC))[1] AS count_after
FROM usage_buckets
WHERE account_id = %(account_id)s AND device_class = ANY(%(classes)s::text[])
  AND bucket >= %(start)s AND bucket < %(end)s
GROUP BY device_class, day
ORDER BY device_class, day
"""

# The same rows, kept per local day by the trigger (migration 0019) when the days are in ``tz``.
_KEPT_DAYS: Final = """
SELECT device_class, (day AT TIME ZONE %(tz)s)::date AS day, max_count, max_at, count_after
FROM usage_days
WHERE account_id = %(account_id)s AND device_class = ANY(%(classes)s::text[])
  AND day >= %(start)s AND day < %(end)s
ORDER BY device_class, day
"""

# Steps exactly at a day's (or the month's) first instant belong to it (M3): the count there is
# the one after them, not the one before.
_STEPS_AT: Final = """
SELECT device_class, time FROM usage_steps
WHERE account_id = %(account_id)s AND device_class = ANY(%(classes)s::text[])
  AND time = ANY(%(instants)s::timestamptz[])
"""


@dataclass(frozen=True, slots=True)
class _Bucket:
    """A local day's buckets of one class, folded."""

    day: date
    max_count: int
    max_at: datetime
    count_after: int


@dataclass(frozen=True, slots=True)
class _Figures:
    opening: dict[str, int]
    first_at: dict[str, datetime]
    buckets: dict[str, list[_Bucket]]
    stepped: set[tuple[str, datetime]]


def _load(
    conn: Conn,
    account_id: int,
    start: datetime,
    end: datetime,
    tz: str,
    instants: Sequence[datetime],
) -> _Figures:
    params: dict[str, Any] = {
        "account_id": account_id,
        "start": start,
        "end": end,
        "tz": tz,
        "instants": list(instants),
    }
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_CLASSES, params).fetchall()
        opening = {r["device_class"]: r["opening"] for r in rows}
        first_at = {r["device_class"]: r["first_at"].astimezone(UTC) for r in rows}
        params["classes"] = list(opening)
        buckets: dict[str, list[_Bucket]] = {c: [] for c in opening}
        kept = (
            all(r["days_zone"] == tz for r in rows) and _midnight(start, tz) and _midnight(end, tz)
        )
        for r in cur.execute(_KEPT_DAYS if kept else _DAYS, params):
            buckets[r["device_class"]].append(
                _Bucket(r["day"], r["max_count"], r["max_at"].astimezone(UTC), r["count_after"])
            )
        stepped = {
            (r["device_class"], r["time"].astimezone(UTC)) for r in cur.execute(_STEPS_AT, params)
        }
    return _Figures(opening, first_at, buckets, stepped)


def _midnight(at: datetime, tz: str) -> bool:
    local = at.astimezone(ZoneInfo(tz))
    return local == datetime(local.year, local.month, local.day, tzinfo=local.tzinfo)


def _peak(
    opening: int, buckets: Sequence[_Bucket], start: datetime, stepped_at_start: bool
) -> tuple[int, datetime]:
    """The highest count over ``[start, …)`` and the first instant it is reached."""
    best, best_at = (-1, start) if stepped_at_start else (opening, start)
    for bucket in buckets:
        if bucket.max_count > best:
            best, best_at = bucket.max_count, bucket.max_at
    return max(best, 0), best_at


def month_peaks(
    conn: Conn, account_id: int, start: datetime, end: datetime, tz: str = "UTC"
) -> dict[str, ClassPeak]:
    """Each class's peak over ``[start, end)`` (M2, M3), as ``compute_peaks`` finds it, without
    the devices behind it. ``tz``, the account's zone, lets it read the days kept for it; the
    peak is the same in any zone (days only fold rows)."""
    figures = _load(conn, account_id, start, end, tz, [start])
    out: dict[str, ClassPeak] = {}
    for cls, opening in figures.opening.items():
        peak, at = _peak(opening, figures.buckets[cls], start, (cls, start) in figures.stepped)
        out[cls] = ClassPeak(cls, peak, at, ())
    return out


def daily(
    conn: Conn,
    account_id: int,
    start: datetime,
    end: datetime,
    tz: str,
    *,
    until: datetime | None = None,
) -> list[DayUsage]:
    """Per local day of ``[start, end)`` (to ``until``'s day): each class's peak and the count
    at the day's end, as ``metering.daily.daily_usage`` finds them."""
    zone = ZoneInfo(tz)
    stop = min(end, until) if until is not None else end
    days: list[tuple[date, datetime, datetime]] = []
    day = start.astimezone(zone).date()
    day_start = start
    while day_start < stop:
        following = day + timedelta(days=1)
        day_end = min(datetime(following.year, following.month, following.day, tzinfo=zone), end)
        day_end = day_end.astimezone(UTC)
        days.append((day, day_start, day_end))
        day, day_start = following, day_end
    figures = _load(conn, account_id, start, end, tz, [d[1] for d in days])
    out: list[DayUsage] = []
    position = dict.fromkeys(figures.opening, 0)
    count = dict(figures.opening)
    for day, day_start, day_end in days:
        classes: dict[str, tuple[int, int]] = {}
        for cls in figures.opening:
            buckets = figures.buckets[cls]
            i = position[cls]
            inside: list[_Bucket] = []
            while i < len(buckets) and buckets[i].day <= day:
                inside.append(buckets[i])
                i += 1
            position[cls] = i
            peak, _ = _peak(count[cls], inside, day_start, (cls, day_start) in figures.stepped)
            if inside:
                count[cls] = inside[-1].count_after
            # A class shows from the day of its first event, as the replay shows it.
            if figures.first_at[cls] < day_end:
                classes[cls] = (peak, count[cls])
        out.append(DayUsage(day, classes))
    return out
