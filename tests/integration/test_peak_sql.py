"""The database peaks against the pure one (metering.peak) on the same events: the SQL path
(metering.peak_sql) and the NumPy path the close uses (metering.peak_frame)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmeter.db import connect
from metering.peak import ClassPeak, Event, compute_peaks, month_bounds
from metering.peak_frame import Unusable, frame_peaks_many, peaks, peaks_many
from metering.peak_sql import sql_peaks, sql_peaks_many

Conn = psycopg.Connection[dict[str, object]]

START, END = month_bounds("2026-10", "Asia/Tokyo")
US = timedelta(microseconds=1)
# Few instants, so events collide: at and around both month boundaries, and mid-month.
INSTANTS = [
    START - timedelta(days=40),
    START - US,
    START,
    START + US,
    START + timedelta(days=3),
    START + timedelta(days=3, microseconds=1),
    START + timedelta(days=17),
    END - US,
    END,
    END + timedelta(days=1),
]
# A device's class never changes (it is copied from the device), so it is fixed per id here.
CLASS_OF = {"a1": "lte-m", "a2": "lte-m", "a3": "lte-m", "b1": "wifi", "b2": "wifi"}


def jst(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) - timedelta(hours=9)


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with connect(database_url, autocommit=True) as c:
        yield c


def insert(conn: Conn, account_id: int, events: Sequence[Event]) -> None:
    with conn.cursor().copy(
        "COPY device_state_events (time, id, device_id, account_id, device_class, state, source)"
        " FROM STDIN"
    ) as copy:
        for e in events:
            copy.write_row(
                (e.time, e.order, e.device_id, account_id, e.device_class, e.state, "import")
            )


def event_lists(orders: st.SearchStrategy[int]) -> st.SearchStrategy[list[Event]]:
    one = st.builds(
        lambda device, instant, state, order: Event(
            instant, device, CLASS_OF[device], state, order
        ),
        st.sampled_from(sorted(CLASS_OF)),
        st.sampled_from(INSTANTS),
        st.sampled_from(["active", "inactive"]),
        orders,
    )
    # Duplicates: some events are repeated verbatim, as redelivery or a re-import would.
    return st.lists(one, max_size=30).flatmap(
        lambda events: (
            st.lists(st.sampled_from(events), max_size=5).map(lambda dup: events + dup)
            if events
            else st.just(events)
        )
    )


# Few distinct orders, so one device's events at one instant often tie on time and fight on
# order; an order shared by two different events is an exact tie settled by state in both paths.
ORDERS = st.integers(min_value=1, max_value=12)
# Classes counted as distinct devices (M6): none, one of the two, a class with no devices, both.
DISTINCT = st.sampled_from(
    [frozenset(), frozenset({"lte-m"}), frozenset({"wifi", "nb-iot"}), frozenset(CLASS_OF.values())]
)


@settings(
    max_examples=150,
    deadline=None,
    # One database for the whole test; each example rolls its events back.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(first=event_lists(ORDERS), second=event_lists(ORDERS), distinct=DISTINCT)
def test_sql_agrees_with_compute_peaks(
    conn: Conn, first: list[Event], second: list[Event], distinct: frozenset[str]
) -> None:
    # Each example in its own transaction, rolled back: the table is empty for the next.
    with conn.transaction(force_rollback=True):
        insert(conn, 1, first)
        # Another account's events, with the same device ids, must never leak into account 1.
        insert(conn, 2, second)

        expected = compute_peaks(first, START, END)
        assert sql_peaks(conn, 1, START, END) == expected
        assert sql_peaks_many(conn, [1, 2, 3], START, END) == {
            1: expected,
            2: compute_peaks(second, START, END),
            3: {},
        }
        assert sql_peaks_many(conn, [1, 2, 3], START, END, distinct=distinct) == {
            1: compute_peaks(first, START, END, distinct=distinct),
            2: compute_peaks(second, START, END, distinct=distinct),
            3: {},
        }


def worked_example() -> list[Event]:
    registered = [
        *((jst("2026-09-30T10:00"), n, "active") for n in range(1, 9)),
        *((jst("2026-10-05T09:00"), n, "active") for n in range(9, 13)),
        *((jst("2026-10-10T12:00"), n, "inactive") for n in range(1, 5)),
        *((jst("2026-10-20T08:00"), n, "active") for n in range(13, 17)),
        (jst("2026-10-25T18:00"), 5, "inactive"),
        (jst("2026-10-31T23:59:59"), 17, "active"),
        (datetime(2026, 10, 31, 16, 0, tzinfo=UTC), 18, "active"),
    ]
    return [
        Event(at, f"d{n}", "lte-m", state, order)
        for order, (at, n, state) in enumerate(registered, start=1)
    ]


def test_worked_example_through_sql(conn: Conn) -> None:
    insert(conn, 1, worked_example())
    d = [f"d{n}" for n in range(1, 19)]
    assert sql_peaks(conn, 1, START, END) == {
        "lte-m": ClassPeak("lte-m", 12, jst("2026-10-05T09:00"), tuple(sorted(d[0:12])))
    }
    nov_start, nov_end = month_bounds("2026-11", "Asia/Tokyo")
    assert sql_peaks(conn, 1, nov_start, nov_end) == {
        "lte-m": ClassPeak(
            "lte-m", 13, datetime(2026, 10, 31, 16, 0, tzinfo=UTC), tuple(sorted(d[5:18]))
        )
    }
    # Distinct (M6): every device Active in October, the last of them d17 at 23:59:59.
    assert sql_peaks(conn, 1, START, END, distinct=frozenset({"lte-m"})) == {
        "lte-m": ClassPeak("lte-m", 17, jst("2026-10-31T23:59:59"), tuple(sorted(d[0:17])))
    }


def test_events_written_by_the_registry_are_counted(database_url: str) -> None:
    from tests.conftest import seed_fleet

    seed_fleet(database_url, [("d1", "lte-m", None), ("g1", "gateway", None)], START)
    with connect(database_url) as c:
        row = c.execute("SELECT id FROM accounts WHERE ref = 'acme'").fetchone()
        assert row is not None
        account_id = row["id"]
        assert isinstance(account_id, int)
        peaks = sql_peaks(c, account_id, START, END)
    assert peaks == {
        "gateway": ClassPeak("gateway", 1, START, ("g1",)),
        "lte-m": ClassPeak("lte-m", 1, START, ("d1",)),
    }


def test_sql_peaks_many_two_accounts(conn: Conn) -> None:
    t = START + timedelta(days=1)
    insert(conn, 1, worked_example())
    insert(
        conn,
        2,
        [
            Event(START - timedelta(days=1), "x1", "wifi", "active", 1),
            Event(t, "x2", "wifi", "active", 2),
            Event(t, "x1", "wifi", "inactive", 3),  # a same-instant swap: still 1
            Event(t + US, "x3", "gateway", "inactive", 4),
        ],
    )
    many = sql_peaks_many(conn, [2, 1, 99], START, END)
    assert many == {
        1: sql_peaks(conn, 1, START, END),
        2: {
            "gateway": ClassPeak("gateway", 0, START, ()),
            "wifi": ClassPeak("wifi", 1, START, ("x1",)),
        },
        99: {},
    }
    assert many[1]["lte-m"].peak == 12
    assert sql_peaks_many(conn, [], START, END) == {}


def planner_settings(conn: Conn) -> dict[str, object] | None:
    return conn.execute(
        "SELECT current_setting('work_mem') AS work_mem, current_setting('jit') AS jit"
    ).fetchone()


def test_planner_settings_are_the_callers_again_afterwards(conn: Conn) -> None:
    before = planner_settings(conn)
    sql_peaks(conn, 1, START, END)
    assert planner_settings(conn) == before
    # Inside the caller's transaction, the caller's own SET LOCAL values survive.
    with conn.transaction():
        conn.execute("SET LOCAL work_mem = '5MB'")
        conn.execute("SET LOCAL jit = on")
        sql_peaks(conn, 1, START, END)
        assert planner_settings(conn) == {"work_mem": "5MB", "jit": "on"}


# --- the NumPy path -------------------------------------------------------------------------


def register(conn: Conn, account_id: int, events: Sequence[Event]) -> None:
    """The account and a ``devices`` row for each device the events name: the NumPy path
    takes device ids, accounts and classes from there."""
    conn.execute(
        "INSERT INTO accounts (id, ref, name, plan, country, timezone, signed_up_on)"
        " OVERRIDING SYSTEM VALUE VALUES (%s, %s, 'A', 'standard', 'JP', 'Asia/Tokyo',"
        " '2026-01-01') ON CONFLICT DO NOTHING",
        (account_id, f"acct{account_id}"),
    )
    for device_id, device_class in sorted({(e.device_id, e.device_class) for e in events}):
        conn.execute(
            "INSERT INTO devices (id, account_id, device_class, key_prefix, key_hash,"
            " registered_at, state, state_at) VALUES (%s, %s, %s, 'dmk_test',"
            " sha256(convert_to(%s, 'UTF8')), %s, 'active', %s)",
            (device_id, account_id, device_class, device_id, START, START),
        )


def renamed(events: list[Event], prefix: str) -> list[Event]:
    """The same timeline under other device ids: ids are unique across accounts."""
    return [Event(e.time, prefix + e.device_id, e.device_class, e.state, e.order) for e in events]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(first=event_lists(ORDERS), second=event_lists(ORDERS), distinct=DISTINCT)
def test_numpy_path_agrees_with_compute_peaks(
    conn: Conn, first: list[Event], second: list[Event], distinct: frozenset[str]
) -> None:
    second = renamed(second, "z")
    with conn.transaction(force_rollback=True):
        for account_id, events in ((1, first), (2, second)):
            register(conn, account_id, events)
            insert(conn, account_id, events)
        register(conn, 3, [])

        expected = {1: compute_peaks(first, START, END), 2: compute_peaks(second, START, END)}
        # Called directly: a silent fall back to SQL would prove nothing about this path.
        assert frame_peaks_many(conn, [1, 2, 3], START, END) == {**expected, 3: {}}
        assert peaks(conn, 1, START, END) == expected[1]
        assert frame_peaks_many(conn, [1, 2, 3], START, END, distinct=distinct) == {
            1: compute_peaks(first, START, END, distinct=distinct),
            2: compute_peaks(second, START, END, distinct=distinct),
            3: {},
        }


def test_numpy_path_on_the_worked_example(conn: Conn) -> None:
    events = worked_example()
    register(conn, 1, events)
    insert(conn, 1, events)
    assert frame_peaks_many(conn, [1], START, END) == {1: sql_peaks(conn, 1, START, END)}
    assert frame_peaks_many(conn, [1], START, END)[1]["lte-m"].peak == 12
    assert frame_peaks_many(conn, [], START, END) == {}
    lte = frozenset({"lte-m"})
    assert frame_peaks_many(conn, [1], START, END, distinct=lte) == {
        1: sql_peaks(conn, 1, START, END, distinct=lte)
    }
    assert frame_peaks_many(conn, [1], START, END, distinct=lte)[1]["lte-m"].peak == 17


def test_an_event_of_an_unregistered_device_goes_to_the_sql_path(
    conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    events = worked_example()
    register(conn, 1, [e for e in events if e.device_id != "d17"])
    insert(conn, 1, events)  # d17, Active within the month, has no devices row
    with pytest.raises(Unusable, match="devices table does not have"):
        frame_peaks_many(conn, [1], START, END)
    assert peaks_many(conn, [1], START, END) == {1: compute_peaks(events, START, END)}
    assert "computed in SQL instead" in caplog.text
    # The fall back keeps the distinct classes.
    lte = frozenset({"lte-m"})
    assert peaks_many(conn, [1], START, END, distinct=lte) == {
        1: compute_peaks(events, START, END, distinct=lte)
    }
