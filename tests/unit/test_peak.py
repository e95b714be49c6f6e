"""Monthly peaks (M1-M3): month bounds in a billing time zone, and the peak rules, as tables."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from devmeter.errors import InvalidError
from metering.peak import ClassPeak, Event, compute_peaks, month_bounds, parse_month

JST = timedelta(hours=9)
OCT_START, OCT_END = month_bounds("2026-10", "Asia/Tokyo")
NOV_START, NOV_END = month_bounds("2026-11", "Asia/Tokyo")
_order = itertools.count(1)


def jst(text: str) -> datetime:
    """A wall-clock time in Tokyo, as the SPEC's example writes them, in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC) - JST


def ev(
    at: datetime, device: str, state: str = "active", cls: str = "lte-m", order: int | None = None
) -> Event:
    return Event(at, device, cls, state, next(_order) if order is None else order)


def devices(*numbers: int) -> tuple[str, ...]:
    return tuple(sorted(f"d{n}" for n in numbers))


def worked_example() -> list[Event]:
    """SPEC's worked example, plus d18 registered 2026-10-31T16:00Z (November in Tokyo)."""
    return [
        *(ev(jst("2026-09-30T10:00"), f"d{n}") for n in range(1, 9)),
        *(ev(jst("2026-10-05T09:00"), f"d{n}") for n in range(9, 13)),
        *(ev(jst("2026-10-10T12:00"), f"d{n}", "inactive") for n in range(1, 5)),
        *(ev(jst("2026-10-20T08:00"), f"d{n}") for n in range(13, 17)),
        ev(jst("2026-10-25T18:00"), "d5", "inactive"),
        ev(jst("2026-10-31T23:59:59"), "d17"),
        ev(datetime(2026, 10, 31, 16, 0, tzinfo=UTC), "d18"),
    ]


# --- month bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("month", "tz", "start", "end"),
    [
        ("2026-10", "Asia/Tokyo", "2026-09-30T15:00", "2026-10-31T15:00"),
        ("2026-01", "Asia/Tokyo", "2025-12-31T15:00", "2026-01-31T15:00"),
        ("2026-12", "Asia/Tokyo", "2026-11-30T15:00", "2026-12-31T15:00"),
        ("2026-10", "UTC", "2026-10-01T00:00", "2026-11-01T00:00"),
        ("2026-12", "UTC", "2026-12-01T00:00", "2027-01-01T00:00"),
        ("2026-03", "America/New_York", "2026-03-01T05:00", "2026-04-01T04:00"),
        ("2026-11", "America/New_York", "2026-11-01T04:00", "2026-12-01T05:00"),
    ],
)
def test_month_bounds(month: str, tz: str, start: str, end: str) -> None:
    got = month_bounds(month, tz)
    assert got == (
        datetime.fromisoformat(start).replace(tzinfo=UTC),
        datetime.fromisoformat(end).replace(tzinfo=UTC),
    )
    assert all(t.utcoffset() == timedelta(0) for t in got)


@pytest.mark.parametrize(
    ("month", "tz", "hours"),
    [
        ("2026-02", "UTC", 28 * 24),
        ("2028-02", "UTC", 29 * 24),
        ("2100-02", "UTC", 28 * 24),  # divisible by 100, not by 400: not a leap year
        ("2000-02", "Asia/Tokyo", 29 * 24),
        ("2026-04", "Asia/Tokyo", 30 * 24),
        ("2026-10", "Asia/Tokyo", 31 * 24),
        # DST: March loses an hour, November gains one.
        ("2026-03", "America/New_York", 31 * 24 - 1),
        ("2026-11", "America/New_York", 30 * 24 + 1),
        ("2026-06", "America/New_York", 30 * 24),
    ],
)
def test_month_length_in_hours(month: str, tz: str, hours: int) -> None:
    start, end = month_bounds(month, tz)
    assert end - start == timedelta(hours=hours)


def test_consecutive_months_meet() -> None:
    for tz in ("Asia/Tokyo", "UTC", "America/New_York"):
        for number in range(1, 12):
            assert (
                month_bounds(f"2026-{number:02}", tz)[1]
                == (month_bounds(f"2026-{number + 1:02}", tz)[0])
            )
        assert month_bounds("2026-12", tz)[1] == month_bounds("2027-01", tz)[0]


def test_parse_month() -> None:
    assert parse_month("2026-10") == (2026, 10)
    assert parse_month("1970-01") == (1970, 1)


@pytest.mark.parametrize(
    "month",
    [
        "",
        "2026",
        "2026-1",
        "2026-00",
        "2026-13",
        "2026/10",
        "26-10",
        "2026-10-01",
        " 2026-10",
        "2026-10\n",
        "\uff12\uff10\uff12\uff16-10",  # full-width digits: \d and int() take them
        "0000-01",
        "9999-12",
    ],
)
def test_malformed_month_refused(month: str) -> None:
    with pytest.raises(InvalidError) as exc:
        month_bounds(month, "Asia/Tokyo")
    assert exc.value.field == "month"


def test_unknown_time_zone_refused() -> None:
    with pytest.raises(InvalidError) as exc:
        month_bounds("2026-10", "Asia/Tokio")
    assert exc.value.field == "timezone"


# --- peaks --------------------------------------------------------------------------------------


def test_worked_example_october() -> None:
    assert compute_peaks(worked_example(), OCT_START, OCT_END) == {
        "lte-m": ClassPeak("lte-m", 12, jst("2026-10-05T09:00"), devices(*range(1, 13)))
    }


def test_worked_example_november_starts_with_twelve_then_d18() -> None:
    assert compute_peaks(worked_example(), NOV_START, NOV_END) == {
        "lte-m": ClassPeak(
            "lte-m", 13, datetime(2026, 10, 31, 16, 0, tzinfo=UTC), devices(*range(6, 19))
        )
    }
    # Without d18 the peak is November's first instant: the 12 carried over (M4's flip side).
    without_d18 = [e for e in worked_example() if e.device_id != "d18"]
    assert compute_peaks(without_d18, NOV_START, NOV_END)["lte-m"] == ClassPeak(
        "lte-m", 12, NOV_START, devices(*range(6, 18))
    )


def test_no_events_no_classes() -> None:
    assert compute_peaks([], OCT_START, OCT_END) == {}


def test_class_with_devices_never_active_peaks_at_zero() -> None:
    events = [
        ev(OCT_START - timedelta(days=3), "d1"),
        ev(OCT_START - timedelta(days=1), "d1", "inactive"),
        ev(OCT_START + timedelta(days=2), "w1", "inactive", cls="wifi"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END) == {
        "lte-m": ClassPeak("lte-m", 0, OCT_START, ()),
        "wifi": ClassPeak("wifi", 0, OCT_START, ()),
    }


def test_class_only_after_the_month_is_not_there() -> None:
    assert compute_peaks([ev(OCT_END, "d1")], OCT_START, OCT_END) == {}


def test_month_starting_with_devices_active() -> None:
    events = [ev(OCT_START - timedelta(days=40), f"d{n}") for n in range(1, 6)]
    events.append(ev(OCT_START + timedelta(days=1), "d1", "inactive"))
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 5, OCT_START, devices(1, 2, 3, 4, 5)
    )


def test_event_exactly_at_start_is_the_first_instant() -> None:
    events = [
        ev(OCT_START - timedelta(hours=1), "d1"),
        ev(OCT_START - timedelta(hours=1), "d2"),
        # At the first instant d1 leaves and d3 arrives: still 2, never 3 (M3).
        ev(OCT_START, "d1", "inactive"),
        ev(OCT_START, "d3"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, OCT_START, devices(2, 3)
    )


def test_events_at_or_after_end_ignored() -> None:
    events = [
        ev(OCT_START + timedelta(days=1), "d1"),
        ev(OCT_END - timedelta(microseconds=1), "d2"),
        ev(OCT_END, "d3"),
        ev(OCT_END + timedelta(days=1), "d4"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, OCT_END - timedelta(microseconds=1), devices(1, 2)
    )


def test_same_instant_swap_does_not_raise_peak() -> None:
    t = OCT_START + timedelta(days=3)
    events = [
        ev(OCT_START + timedelta(days=1), "d1"),
        ev(OCT_START + timedelta(days=1), "d2"),
        ev(t, "d3"),  # d3 arrives before d1 leaves, but at the same instant
        ev(t, "d1", "inactive"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, OCT_START + timedelta(days=1), devices(1, 2)
    )


def test_swap_a_microsecond_apart_does_raise_peak() -> None:
    t = OCT_START + timedelta(days=3)
    events = [
        ev(OCT_START + timedelta(days=1), "d1"),
        ev(t, "d3"),
        ev(t + timedelta(microseconds=1), "d1", "inactive"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, t, devices(1, 3)
    )


def test_device_flipping_many_times_in_one_instant() -> None:
    t = OCT_START + timedelta(days=5)
    flips = [ev(t, "d2", "active" if k % 2 == 0 else "inactive") for k in range(101)]
    events = [ev(OCT_START + timedelta(days=1), "d1"), *flips]
    # The last recorded (highest order) is "active": one more device from t on.
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, t, devices(1, 2)
    )
    # Ending on "inactive", the flips change nothing at all.
    assert compute_peaks([events[0], *flips[:-1]], OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 1, OCT_START + timedelta(days=1), devices(1)
    )


def test_device_flipping_many_times_in_one_second() -> None:
    t = OCT_START + timedelta(days=5)
    events = [ev(OCT_START + timedelta(days=1), "d1")]
    for k in range(1000):
        events.append(ev(t + timedelta(microseconds=k * 1000), "d2", "active"))
        events.append(ev(t + timedelta(microseconds=k * 1000 + 500), "d2", "inactive"))
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, t, devices(1, 2)
    )


def test_same_instant_same_device_tie_broken_by_order() -> None:
    t = OCT_START + timedelta(days=2)
    later_inactive = [ev(t, "d1", "active", order=10), ev(t, "d1", "inactive", order=11)]
    later_active = [ev(t, "d1", "inactive", order=10), ev(t, "d1", "active", order=11)]
    assert compute_peaks(later_inactive, OCT_START, OCT_END)["lte-m"].peak == 0
    assert compute_peaks(later_inactive[::-1], OCT_START, OCT_END)["lte-m"].peak == 0
    assert compute_peaks(later_active, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 1, t, ("d1",)
    )
    assert compute_peaks(later_active[::-1], OCT_START, OCT_END)["lte-m"].peak == 1


def test_older_event_received_later_does_not_override() -> None:
    # D3: event time decides, not order of arrival (a larger `order` at an older time loses).
    events = [
        ev(OCT_START + timedelta(days=2), "d1", "inactive", order=1),
        ev(OCT_START + timedelta(days=1), "d1", "active", order=2),
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 1, OCT_START + timedelta(days=1), ("d1",)
    )


def test_out_of_order_and_repeated_events_give_the_same_answer() -> None:
    expected = compute_peaks(worked_example(), OCT_START, OCT_END)
    shuffled = worked_example() * 3  # the same events (same order values) three times over
    random.Random(7).shuffle(shuffled)
    assert compute_peaks(shuffled, OCT_START, OCT_END) == expected
    assert compute_peaks(iter(shuffled), OCT_START, OCT_END) == expected


def test_peak_at_is_the_first_instant_the_maximum_is_reached() -> None:
    day = timedelta(days=1)
    events = [
        ev(OCT_START + 1 * day, "d1"),
        ev(OCT_START + 2 * day, "d2"),
        ev(OCT_START + 3 * day, "d2", "inactive"),
        ev(OCT_START + 4 * day, "d3"),  # back to 2 with other devices: not the first time
    ]
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 2, OCT_START + 2 * day, devices(1, 2)
    )


def test_classes_counted_apart() -> None:
    t = OCT_START + timedelta(days=1)
    events = [
        ev(t, "d1"),
        ev(t, "d2"),
        ev(t, "g1", cls="gateway"),
        ev(t + timedelta(hours=1), "d1", "inactive"),
        ev(t + timedelta(hours=2), "g2", cls="gateway"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END) == {
        "gateway": ClassPeak("gateway", 2, t + timedelta(hours=2), ("g1", "g2")),
        "lte-m": ClassPeak("lte-m", 2, t, devices(1, 2)),
    }


def test_utc_month() -> None:
    start, end = month_bounds("2026-10", "UTC")
    events = [
        ev(datetime(2026, 9, 30, 20, 0, tzinfo=UTC), "d1"),  # October in Tokyo, not in UTC
        ev(datetime(2026, 10, 31, 16, 0, tzinfo=UTC), "d2"),  # November in Tokyo, October in UTC
    ]
    assert compute_peaks(events, start, end)["lte-m"] == ClassPeak(
        "lte-m", 2, datetime(2026, 10, 31, 16, 0, tzinfo=UTC), devices(1, 2)
    )
    assert compute_peaks(events, OCT_START, OCT_END)["lte-m"] == ClassPeak(
        "lte-m", 1, datetime(2026, 9, 30, 20, 0, tzinfo=UTC), devices(1)
    )


def test_naive_bounds_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_peaks([], datetime(2026, 10, 1), datetime(2026, 11, 1))  # noqa: DTZ001


def test_large_fleet_is_linearithmic() -> None:
    # 100k events over 10k devices: a quadratic sweep or per-peak snapshot would not finish.
    rng = random.Random(1)
    month = int((OCT_END - OCT_START).total_seconds())
    events = [
        ev(
            OCT_START + timedelta(seconds=rng.randrange(-86_400, month)),
            f"d{rng.randrange(10_000)}",
            "active" if rng.random() < 0.6 else "inactive",
        )
        for _ in range(100_000)
    ]
    peaks = compute_peaks(events, OCT_START, OCT_END)
    assert peaks["lte-m"].peak == len(peaks["lte-m"].device_ids) > 0


# --- distinct vs peak on the same timeline (M6) ---------------------------------------------------


def day(n: float) -> datetime:
    return OCT_START + timedelta(days=n)


def on_off_at_once(at: datetime, device: str) -> list[Event]:
    """Switched on, then off, at one instant: the off is recorded later and wins (D3, M3)."""
    return [ev(at, device, "active", order=10_000), ev(at, device, "inactive", order=10_001)]


def off_on_at_once(at: datetime, device: str) -> list[Event]:
    return [ev(at, device, "inactive", order=10_000), ev(at, device, "active", order=10_001)]


LTE = frozenset({"lte-m"})

# (events, month, peak's answer, distinct's answer), each for class lte-m.
TIMELINES = [
    pytest.param(
        [ev(day(-40), "d1"), ev(day(-40), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 2, OCT_START, devices(1, 2)),
        ClassPeak("lte-m", 2, OCT_START, devices(1, 2)),
        id="active-from-before-the-month",
    ),
    pytest.param(
        [ev(day(-40), "d1"), ev(day(5), "d1", "inactive"), ev(day(10), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 1, OCT_START, devices(1)),
        ClassPeak("lte-m", 2, day(10), devices(1, 2)),
        id="added-mid-month-counts-for-distinct",
    ),
    pytest.param(
        [ev(day(1), "d1"), ev(day(1), "d2"), ev(day(3), "d3"), ev(day(3), "d1", "inactive")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 2, day(1), devices(1, 2)),
        ClassPeak("lte-m", 3, day(3), devices(1, 2, 3)),
        id="swap-at-one-instant-peak-unchanged-distinct-plus-one",
    ),
    pytest.param(
        [ev(day(1), "d1"), ev(day(10), "d1", "inactive"), ev(day(2), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 2, day(2), devices(1, 2)),
        ClassPeak("lte-m", 2, day(2), devices(1, 2)),
        id="set-inactive-mid-month-still-counted-that-month",
    ),
    pytest.param(
        [ev(day(1), "d1"), ev(day(10), "d1", "inactive"), ev(day(2), "d2")],
        (NOV_START, NOV_END),
        ClassPeak("lte-m", 1, NOV_START, devices(2)),
        ClassPeak("lte-m", 1, NOV_START, devices(2)),
        id="set-inactive-not-counted-next-month",
    ),
    pytest.param(
        [ev(day(1), "d1"), *on_off_at_once(day(2), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 1, day(1), devices(1)),
        ClassPeak("lte-m", 1, day(1), devices(1)),
        id="on-and-off-at-one-instant-never-active",
    ),
    pytest.param(
        [ev(day(1), "d1"), *off_on_at_once(day(2), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 2, day(2), devices(1, 2)),
        ClassPeak("lte-m", 2, day(2), devices(1, 2)),
        id="off-and-on-at-one-instant-active-from-it",
    ),
    pytest.param(
        [ev(day(-1), "d1"), *on_off_at_once(OCT_START, "d2"), ev(OCT_START, "d1", "inactive")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 0, OCT_START, ()),
        ClassPeak("lte-m", 0, OCT_START, ()),
        id="switched-off-at-the-first-instant-never-active",
    ),
    pytest.param(
        [ev(day(-3), "d1"), ev(day(-1), "d1", "inactive")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 0, OCT_START, ()),
        ClassPeak("lte-m", 0, OCT_START, ()),
        id="inactive-all-month-class-still-listed",
    ),
    pytest.param(
        [ev(day(1), "d1"), ev(day(2), "d1", "inactive"), ev(day(3), "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 1, day(1), devices(1)),
        ClassPeak("lte-m", 2, day(3), devices(1, 2)),
        id="one-after-the-other",
    ),
    pytest.param(
        [
            ev(day(1), "d1"),
            *(ev(day(n), "d1", "inactive" if n % 2 else "active") for n in range(2, 20)),
        ],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 1, day(1), devices(1)),
        ClassPeak("lte-m", 1, day(1), devices(1)),
        id="flipping-device-counted-once-from-its-first-instant",
    ),
    pytest.param(
        [ev(OCT_END - timedelta(microseconds=1), "d1"), ev(OCT_END, "d2")],
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 1, OCT_END - timedelta(microseconds=1), devices(1)),
        ClassPeak("lte-m", 1, OCT_END - timedelta(microseconds=1), devices(1)),
        id="last-microsecond-counts-the-end-does-not",
    ),
    pytest.param(
        worked_example(),
        (OCT_START, OCT_END),
        ClassPeak("lte-m", 12, jst("2026-10-05T09:00"), devices(*range(1, 13))),
        ClassPeak("lte-m", 17, jst("2026-10-31T23:59:59"), devices(*range(1, 18))),
        id="worked-example-october",
    ),
    pytest.param(
        worked_example(),
        (NOV_START, NOV_END),
        ClassPeak("lte-m", 13, datetime(2026, 10, 31, 16, tzinfo=UTC), devices(*range(6, 19))),
        ClassPeak("lte-m", 13, datetime(2026, 10, 31, 16, tzinfo=UTC), devices(*range(6, 19))),
        id="worked-example-november",
    ),
]


@pytest.mark.parametrize(("events", "month", "peak", "distinct"), TIMELINES)
def test_distinct_vs_peak_on_the_same_timeline(
    events: list[Event], month: tuple[datetime, datetime], peak: ClassPeak, distinct: ClassPeak
) -> None:
    start, end = month
    assert compute_peaks(events, start, end) == {"lte-m": peak}
    assert compute_peaks(events, start, end, distinct=LTE) == {"lte-m": distinct}
    # Arrival order never matters (D3), for either metric.
    shuffled = events * 2
    random.Random(3).shuffle(shuffled)
    assert compute_peaks(shuffled, start, end, distinct=LTE) == {"lte-m": distinct}


def test_distinct_only_for_the_classes_named() -> None:
    events = [
        ev(day(1), "d1"),
        ev(day(2), "d1", "inactive"),
        ev(day(3), "d2"),
        ev(day(1), "w1", cls="wifi"),
        ev(day(2), "w1", "inactive", cls="wifi"),
        ev(day(3), "w2", cls="wifi"),
        ev(day(1), "g1", "inactive", cls="gateway"),
    ]
    assert compute_peaks(events, OCT_START, OCT_END, distinct=frozenset({"wifi", "gateway"})) == {
        "gateway": ClassPeak("gateway", 0, OCT_START, ()),
        "lte-m": ClassPeak("lte-m", 1, day(1), devices(1)),
        "wifi": ClassPeak("wifi", 2, day(3), ("w1", "w2")),
    }
    # A distinct class that has no devices at all is simply absent, as for peaks.
    assert compute_peaks(events, OCT_START, OCT_END, distinct=frozenset({"nb-iot"})) == (
        compute_peaks(events, OCT_START, OCT_END)
    )


def test_distinct_is_at_least_the_peak_on_a_random_fleet() -> None:
    rng = random.Random(5)
    month = int((OCT_END - OCT_START).total_seconds())
    events = [
        ev(
            OCT_START + timedelta(seconds=rng.randrange(-86_400, month, 3600)),
            f"d{rng.randrange(300)}",
            "active" if rng.random() < 0.5 else "inactive",
        )
        for _ in range(5_000)
    ]
    peak = compute_peaks(events, OCT_START, OCT_END)["lte-m"]
    distinct = compute_peaks(events, OCT_START, OCT_END, distinct=LTE)["lte-m"]
    assert distinct.peak >= peak.peak
    assert set(peak.device_ids) <= set(distinct.device_ids)
    assert distinct.peak == len(distinct.device_ids)
