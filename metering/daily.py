"""Per-day usage of a month, for charts: each local day's peak and end-of-day Active count.

The same rules as the monthly peak (D3, M2, M3), cut at local midnights of the account's
zone; the month's peak is the largest of the days' peaks. Computed in Python from one
account's events, which is small next to a month close over every account.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import psycopg

from metering.peak import Event, replay_order

_EVENTS_SQL: Final = """
(SELECT DISTINCT ON (device_id) time, id, device_id, device_class, state
 FROM device_state_events
 WHERE account_id = %(account_id)s AND time <= %(start)s
 ORDER BY device_id, time DESC, id DESC)
UNION ALL
SELECT time, id, device_id, device_class, state
FROM device_state_events
WHERE account_id = %(account_id)s AND time > %(start)s AND time < %(end)s
"""


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: date
    #: Per class: (peak during the day, Active count at the day's end).
    classes: dict[str, tuple[int, int]]


def load_events(
    conn: psycopg.Connection[Any], account_id: int, start: datetime, end: datetime
) -> list[Event]:
    """Each device's latest event at or before ``start`` (its state then) and the month's."""
    rows = conn.execute(
        _EVENTS_SQL, {"account_id": account_id, "start": start, "end": end}
    ).fetchall()
    return [Event(r["time"], r["device_id"], r["device_class"], r["state"], r["id"]) for r in rows]


def daily_usage(
    events: list[Event], start: datetime, end: datetime, tz: str, *, until: datetime | None = None
) -> list[DayUsage]:
    """Days from ``start`` to ``end`` (or to ``until``'s day, for the open month)."""
    zone = ZoneInfo(tz)
    stop = min(end, until) if until is not None else end
    # The monthly peak's order, so a day's figures can never disagree with the month's.
    ordered = replay_order(events, end)

    active: dict[str, bool] = {}
    counts: dict[str, int] = {}
    days: list[DayUsage] = []
    i = 0
    day = start.astimezone(zone).date()
    day_start = start
    while day_start < stop:
        next_day = day + timedelta(days=1)
        # Local midnight, so DST days come out 23 or 25 hours long.
        day_end = min(datetime(next_day.year, next_day.month, next_day.day, tzinfo=zone), end)
        day_end = day_end.astimezone(UTC)
        peaks: dict[str, int] = {}
        while i < len(ordered) and ordered[i].time <= day_start:
            _apply(ordered[i], active, counts)
            i += 1
        for cls, n in counts.items():
            peaks[cls] = n
        while i < len(ordered) and ordered[i].time < day_end:
            instant = ordered[i].time
            # M3: the whole instant first, then look at the counts.
            while i < len(ordered) and ordered[i].time == instant:
                _apply(ordered[i], active, counts)
                i += 1
            for cls, n in counts.items():
                if n > peaks.get(cls, 0):
                    peaks[cls] = n
        days.append(DayUsage(day, {c: (peaks.get(c, 0), counts[c]) for c in sorted(counts)}))
        day, day_start = next_day, day_end
    return days


def _apply(event: Event, active: dict[str, bool], counts: dict[str, int]) -> None:
    is_active = event.state == "active"
    was = active.get(event.device_id, False)
    counts.setdefault(event.device_class, 0)
    active[event.device_id] = is_active
    if is_active and not was:
        counts[event.device_class] += 1
    elif was and not is_active:
        counts[event.device_class] -= 1
