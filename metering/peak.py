"""The metered quantity (SPEC M1-M3, M6): a month's peak of Active devices per device class,
or, for the classes a plan bills by distinct devices, every device Active in the month.

Pure: events in, peaks out. No database, settings or clock here; ``metering.peak_sql``
computes the same thing in PostgreSQL and the integration tests hold the two to agreement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from devmeter.errors import InvalidError

ACTIVE = "active"
INACTIVE = "inactive"

# ASCII digits only, and fullmatch: `\d` takes any script's digits and `$` a trailing newline.
_MONTH = re.compile(r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})")
# Before the epoch nothing was metered; after 9998-12 the month's end is not a datetime.
_MIN_YEAR = 1970
_MAX_YEAR = 9998


@dataclass(frozen=True, slots=True)
class Event:
    """One device state event (D3).

    ``order`` breaks ties between one device's events at the same instant: the larger was
    recorded later and wins (the database's ``id``). ``state`` is ``"active"`` or
    ``"inactive"``; a device's class never changes.
    """

    time: datetime
    device_id: str
    device_class: str
    state: str
    order: int


@dataclass(frozen=True, slots=True)
class ClassPeak:
    """A class's peak and the evidence for it: the devices Active at ``peak_at``, sorted.

    For a class counted as distinct devices (M6), ``peak`` is that count and the evidence is
    every device counted; ``peak_at`` is when the last of them first became Active.
    """

    device_class: str
    peak: int
    peak_at: datetime
    device_ids: tuple[str, ...]


def parse_month(month: str) -> tuple[int, int]:
    """``"YYYY-MM"`` to ``(year, month)``; anything else is refused."""
    match = _MONTH.fullmatch(month)
    if match is None:
        raise InvalidError(
            f"invalid month {month!r}: expected YYYY-MM, e.g. 2026-10", field="month"
        )
    year, number = int(match["year"]), int(match["month"])
    if not 1 <= number <= 12:
        raise InvalidError(f"invalid month {month!r}: month must be 01 to 12", field="month")
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        raise InvalidError(
            f"invalid month {month!r}: year must be {_MIN_YEAR} to {_MAX_YEAR}", field="month"
        )
    return year, number


def month_bounds(month: str, tz: str) -> tuple[datetime, datetime]:
    """The billing month (M1) as ``[start, end)`` in UTC: local midnight of the 1st to the next.

    Computed from local midnights rather than by adding days, so DST months come out 743 or
    721 hours long where the zone says so.
    """
    year, number = parse_month(month)
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidError(
            f"unknown time zone {tz!r} (expected an IANA name such as Asia/Tokyo)",
            field="timezone",
        ) from exc
    next_year, next_number = (year + 1, 1) if number == 12 else (year, number + 1)
    # fold=0: where local midnight is skipped or repeated, the month starts at its first instant.
    start = datetime(year, number, 1, tzinfo=zone).astimezone(UTC)
    end = datetime(next_year, next_number, 1, tzinfo=zone).astimezone(UTC)
    return start, end


def replay_order(events: Iterable[Event], end: datetime) -> list[Event]:
    """The events before ``end`` sorted by (time, order, state).

    In this order each device's winning event at an instant comes last, so replaying it leaves
    every device in its D3 state. ``state`` only settles exact duplicates that disagree (never
    two rows with one id in practice); the SQL path sorts the same way, so both agree even then.
    Three stable sorts on one key each: about twice as fast as one sort on a tuple key.
    """
    ordered = [e for e in events if e.time < end]
    ordered.sort(key=attrgetter("state"))
    ordered.sort(key=attrgetter("order"))
    ordered.sort(key=attrgetter("time"))
    return ordered


def compute_peaks(
    events: Iterable[Event],
    start: datetime,
    end: datetime,
    *,
    distinct: frozenset[str] = frozenset(),
) -> dict[str, ClassPeak]:
    """Peak Active devices per class over ``[start, end)`` (M2), first instant it is reached.

    ``events`` may come in any order, repeat, and include history before ``start`` (which
    gives each device's state when the month starts) and events at or after ``end`` (ignored).
    All events at one instant are applied before counting (M3). A class with devices but none
    Active in the month has peak 0 at ``start``. O(n log n): one sort, then two linear replays.

    Classes in ``distinct`` are counted by the plan's distinct metric instead (M6): see
    ``distinct_peaks``.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    ordered = replay_order(events, end)
    if not distinct:
        return _sweep(ordered, start)
    peaks = _sweep([e for e in ordered if e.device_class not in distinct], start)
    return dict(sorted({**peaks, **distinct_peaks(ordered, start, distinct)}.items()))


def _sweep(ordered: list[Event], start: datetime) -> dict[str, ClassPeak]:
    """The peak metric (M2) of every class of ``ordered``, events in ``replay_order``."""
    active: dict[str, bool] = {}
    counts: dict[str, int] = {}
    best: dict[str, tuple[int, datetime]] = {}
    # Classes whose count rose during the current instant. The maximum is only looked at once
    # an instant is complete (M3), so a swap within one instant never shows as a peak.
    rising: set[str] = set()
    # Everything at or before `start` is the month's first instant.
    instant = start
    for event in ordered:
        if event.time > instant:
            for device_class in rising:
                if counts[device_class] > best[device_class][0]:
                    best[device_class] = (counts[device_class], instant)
            rising.clear()
            instant = event.time
        device_id, device_class = event.device_id, event.device_class
        is_active = event.state == ACTIVE
        was_active = active.get(device_id)
        if was_active is None:
            if device_class not in counts:
                counts[device_class] = 0
                best[device_class] = (0, start)
            was_active = False
        active[device_id] = is_active
        if is_active != was_active:
            if is_active:
                counts[device_class] += 1
                rising.add(device_class)
            else:
                counts[device_class] -= 1
    for device_class in rising:
        if counts[device_class] > best[device_class][0]:
            best[device_class] = (counts[device_class], instant)

    evidence = _evidence(ordered, best)
    return {
        device_class: evidence.get(device_class) or ClassPeak(device_class, 0, start, ())
        for device_class in sorted(best)
    }


def distinct_peaks(
    ordered: list[Event], start: datetime, distinct: frozenset[str]
) -> dict[str, ClassPeak]:
    """The distinct metric (M6) of the ``distinct`` classes: every device Active at some
    instant of the month, from events in ``replay_order`` before the month's end.

    A device counts when its state after some instant of the month is Active: at ``start``
    (its latest event at or before it, D3) or at any later instant. Events at one instant are
    applied together (M3), so a device switched on and off at the same instant was never
    Active and does not count, and a swap at one instant counts both devices (each was Active
    for a while). ``peak_at`` is the instant the count reached its final value: the latest of
    the devices' first Active instants, ``start`` when all were Active as the month began or
    none ever was. ``device_ids`` are all the counted devices, not those Active at ``peak_at``.
    """
    # Each device's first Active instant, per class; every class with an event is a key.
    first: dict[str, dict[str, datetime]] = {}
    # Each device's latest event so far and its instant: it holds once a later instant comes.
    held: dict[str, tuple[datetime, Event]] = {}
    for event in ordered:
        device_class = event.device_class
        if device_class not in distinct:
            continue
        instant = max(event.time, start)
        previous = held.get(event.device_id)
        if previous is None:
            first.setdefault(device_class, {})
        elif previous[0] != instant:
            _settle(first, *previous)
        held[event.device_id] = (instant, event)
    for instant, event in held.values():
        _settle(first, instant, event)
    return {
        device_class: ClassPeak(
            device_class,
            len(devices),
            max(devices.values(), default=start),
            tuple(sorted(devices)),
        )
        for device_class, devices in sorted(first.items())
    }


def _settle(first: dict[str, dict[str, datetime]], instant: datetime, event: Event) -> None:
    """``event`` is its device's last at ``instant``: the state it holds after that instant."""
    if event.state == ACTIVE:
        first[event.device_class].setdefault(event.device_id, instant)


def _evidence(ordered: list[Event], best: dict[str, tuple[int, datetime]]) -> dict[str, ClassPeak]:
    """Replay each class's devices up to its ``peak_at`` to name the devices at the peak."""
    wanted = {c: at for c, (peak, at) in best.items() if peak > 0}
    if not wanted:
        return {}
    last = max(wanted.values())
    # Events of classes without a peak compare against the earliest time, so never count.
    never = datetime.min.replace(tzinfo=UTC)
    latest: dict[str, Event] = {}
    for event in ordered:
        if event.time > last:
            break
        if event.time <= wanted.get(event.device_class, never):
            latest[event.device_id] = event
    by_class: dict[str, list[str]] = {c: [] for c in wanted}
    for device_id, event in latest.items():
        if event.state == ACTIVE:
            by_class[event.device_class].append(device_id)
    result: dict[str, ClassPeak] = {}
    for device_class, device_ids in by_class.items():
        peak, peak_at = best[device_class]
        device_ids.sort()
        # The sweep and the replay disagreeing would be a bug in this module: never bill on it.
        if len(device_ids) != peak:
            raise AssertionError(f"{device_class}: {len(device_ids)} devices at a peak of {peak}")
        result[device_class] = ClassPeak(device_class, peak, peak_at, tuple(device_ids))
    return result
