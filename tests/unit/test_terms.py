"""A contract replayed from its requests (metering/terms.py): the seeds' rows as terms and
charges, then what a request decides (increase, decrease, deadline, restart, refusals)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from devmeter.errors import ConflictError, InvalidError
from metering.catalog import Catalog, parse_catalog
from metering.periods import TermLength, due_date, last_day, local_date, seconds_between
from metering.terms import Charge, Content, Request, Simulation, term_value

TOKYO = "Asia/Tokyo"

CATALOG: Catalog = parse_catalog(
    {
        "plans": {
            "cal": {
                "currency": "JPY",
                "base_fee": "1000",
                "annual_price": "10000",
                "contract_policy": "calendar",
                "classes": {
                    "lte-m": {
                        "mode": "graduated",
                        "tiers": [{"up_to": 10, "price": "100"}, {"price": "80"}],
                    }
                },
            },
            "cal-pro": {
                "currency": "JPY",
                "base_fee": "3000",
                "annual_price": "34000",
                "contract_policy": "calendar",
                "classes": {"lte-m": {"mode": "graduated", "tiers": [{"price": "90"}]}},
            },
            "ann": {
                "currency": "JPY",
                "base_fee": "1000",
                "annual_price": "11000",
                "contract_policy": "anniversary",
                "classes": {"lte-m": {"mode": "graduated", "tiers": [{"price": "100"}]}},
            },
            "ann-pro": {
                "currency": "JPY",
                "base_fee": "3000",
                "annual_price": "33000",
                "contract_policy": "anniversary",
                "classes": {"lte-m": {"mode": "graduated", "tiers": [{"price": "100"}]}},
            },
            "ann-free": {
                "currency": "JPY",
                "base_fee": "0",
                "annual_price": "0",
                "contract_policy": "anniversary",
                "classes": {"lte-m": {"mode": "graduated", "tiers": [{"price": "100"}]}},
            },
        }
    },
    "test",
)


def value(content: Content, length: TermLength) -> Decimal:
    return term_value(CATALOG.plan(content.plan), content.commitments, length)


def jst(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, ss, tzinfo=ZoneInfo(TOKYO))


def start(at: datetime, term: TermLength, plan: str, **commit: int) -> Request:
    return Request(1, "start", at, term=term, content=Content.of(plan, commit))


def run(policy: str, requests: list[Request], until: datetime) -> Simulation:
    assert policy in ("calendar", "anniversary")
    sim = Simulation(policy, TOKYO, "JPY", value, requests[0])
    for request in requests[1:]:
        sim.apply(request)
    sim.advance(until)
    return sim


def row(sim: Simulation, charge: Charge) -> tuple[str, date, date, date, date, str]:
    """kind, issued on, due, first day, last day, amount: as the seeds' tables read."""
    return (
        charge.kind,
        local_date(charge.issued_at, TOKYO),
        due_date(sim.policy, charge.issued_at, TOKYO),
        local_date(charge.starts_at, TOKYO),
        last_day(charge.starts_at, charge.ends_at, TOKYO),
        str(charge.amount),
    )


def issued(sim: Simulation, until: datetime) -> list[tuple[str, date, date, date, date, str]]:
    return [row(sim, c) for c in sim.charges if c.issued_at <= until]


D = date

# --- seed 003 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "first", "fee"),
    [
        ("monthly", (D(2017, 11, 1), D(2017, 11, 30)), "1000"),
        ("annual", (D(2017, 11, 1), D(2018, 10, 31)), "10000"),
    ],
)
def test_calendar_sign_up(term: TermLength, first: tuple[date, date], fee: str) -> None:
    signed = jst(2017, 10, 3, 14)
    sim = run("calendar", [start(signed, term, "cal")], jst(2017, 11, 1))
    assert sim.free_until == jst(2017, 11, 1)
    assert (local_date(signed, TOKYO), last_day(signed, jst(2017, 11, 1), TOKYO)) == (
        D(2017, 10, 3),
        D(2017, 10, 31),
    )
    assert issued(sim, jst(2017, 11, 1)) == [
        ("term_fee", D(2017, 11, 1), D(2017, 12, 31), *first, fee)
    ]
    # Nothing in the free period.
    assert (
        run("calendar", [start(signed, term, "cal")], jst(2017, 10, 31, 23, 59, 59)).charges == []
    )


def test_calendar_increase_in_an_annual_term() -> None:
    requests = [
        start(jst(2017, 9, 15), "annual", "cal", **{"lte-m": 10}),
        Request(2, "change", jst(2018, 3, 20, 10), content=Content.of("cal", {"lte-m": 20})),
    ]
    sim = run("calendar", requests, jst(2018, 4, 1))
    # 10 devices: 10,000 + 12 x 1,000; 20: 10,000 + 12 x 1,800. Difference 9,600 x 6 / 12.
    assert issued(sim, jst(2018, 4, 1)) == [
        ("term_fee", D(2017, 10, 1), D(2017, 11, 30), D(2017, 10, 1), D(2018, 9, 30), "22000"),
        ("proration", D(2018, 4, 1), D(2018, 5, 31), D(2018, 4, 1), D(2018, 9, 30), "4800"),
    ]
    assert sim.charges[1].part == 6
    assert sim.outcomes[1].effect == "now"
    # The next term is billed at the new content.
    sim.advance(jst(2018, 10, 1))
    assert issued(sim, jst(2018, 10, 1))[-1][-1] == "31600"


def test_calendar_monthly_to_annual() -> None:
    requests = [
        start(jst(2017, 10, 3), "monthly", "cal"),
        Request(2, "switch", jst(2017, 10, 20, 12), term="annual"),
    ]
    sim = run("calendar", requests, jst(2018, 12, 1))
    assert issued(sim, jst(2018, 12, 1)) == [
        ("term_fee", D(2017, 11, 1), D(2017, 12, 31), D(2017, 11, 1), D(2017, 11, 30), "1000"),
        ("term_fee", D(2017, 12, 1), D(2018, 1, 31), D(2017, 12, 1), D(2018, 11, 30), "10000"),
        ("term_fee", D(2018, 12, 1), D(2019, 1, 31), D(2018, 12, 1), D(2019, 11, 30), "10000"),
    ]
    assert sim.effective[2] == jst(2017, 12, 1)


def test_calendar_annual_to_monthly() -> None:
    requests = [
        start(jst(2016, 12, 5), "annual", "cal"),
        Request(2, "switch", jst(2017, 11, 20, 12), term="monthly"),
    ]
    sim = run("calendar", requests, jst(2018, 2, 1))
    assert issued(sim, jst(2018, 2, 1)) == [
        ("term_fee", D(2017, 1, 1), D(2017, 2, 28), D(2017, 1, 1), D(2017, 12, 31), "10000"),
        ("term_fee", D(2018, 1, 1), D(2018, 2, 28), D(2018, 1, 1), D(2018, 1, 31), "1000"),
        ("term_fee", D(2018, 2, 1), D(2018, 3, 31), D(2018, 2, 1), D(2018, 2, 28), "1000"),
    ]


def test_calendar_cancellation_of_a_monthly_contract_for_march() -> None:
    requests = [
        start(jst(2018, 9, 10), "monthly", "cal"),
        Request(2, "cancel", jst(2018, 11, 20, 17), end_after=D(2019, 3, 1)),
    ]
    sim = run("calendar", requests, jst(2019, 6, 1))
    rows = issued(sim, jst(2019, 6, 1))
    assert rows[-1] == (
        "term_fee", D(2019, 3, 1), D(2019, 4, 30), D(2019, 3, 1), D(2019, 3, 31), "1000"
    )  # fmt: skip
    assert [r[1] for r in rows] == [D(2018, m, 1) for m in (10, 11, 12)] + [
        D(2019, m, 1) for m in (1, 2, 3)
    ]
    assert sim.ended_at == jst(2019, 4, 1)


def test_calendar_cancellation_of_an_annual_contract_for_december() -> None:
    requests = [
        start(jst(2017, 11, 10), "annual", "cal"),
        Request(2, "cancel", jst(2018, 10, 20, 17), end_after=D(2018, 12, 1)),
    ]
    sim = run("calendar", requests, jst(2019, 6, 1))
    assert issued(sim, jst(2019, 6, 1)) == [
        ("term_fee", D(2017, 12, 1), D(2018, 1, 31), D(2017, 12, 1), D(2018, 11, 30), "10000"),
        ("term_fee", D(2018, 12, 1), D(2019, 1, 31), D(2018, 12, 1), D(2018, 12, 31), "1000"),
    ]
    assert sim.ended_at == jst(2019, 1, 1)


# --- seed 004 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "days", "fee"),
    [
        ("monthly", [D(2020, 10, 13), D(2020, 11, 13), D(2020, 12, 13)], "1000"),
        ("annual", [D(2020, 10, 13), D(2021, 10, 13), D(2022, 10, 13)], "11000"),
    ],
)
def test_anniversary_payment_days(term: TermLength, days: list[date], fee: str) -> None:
    sim = run("anniversary", [start(jst(2020, 10, 13, 9), term, "ann")], jst(2022, 12, 13, 9))
    rows = issued(sim, jst(2022, 12, 13, 9))
    assert [r[1] for r in rows[:3]] == days
    assert [r[2] for r in rows[:3]] == days  # paid by card when charged
    assert {r[-1] for r in rows} == {fee}


@pytest.mark.parametrize(
    ("term", "prorated", "amount", "next_term"),
    [
        # (3,000 - 1,000) x 12 days / 31 days = 774.19
        ("monthly", (D(2020, 11, 1), D(2020, 11, 12)), "774", (D(2020, 11, 13), D(2020, 12, 12))),
        # (33,000 - 11,000) x 346 days / 365 days = 20,854.79
        ("annual", (D(2020, 11, 1), D(2021, 10, 12)), "20854", (D(2021, 10, 13), D(2022, 10, 12))),
    ],
)
def test_anniversary_upgrade(
    term: TermLength, prorated: tuple[date, date], amount: str, next_term: tuple[date, date]
) -> None:
    requests = [
        start(jst(2020, 10, 13), term, "ann"),
        Request(2, "change", jst(2020, 11, 1), content=Content.of("ann-pro", {})),
    ]
    until = jst(2022, 10, 13)
    rows = issued(run("anniversary", requests, until), until)
    assert rows[1] == ("proration", D(2020, 11, 1), D(2020, 11, 1), *prorated, amount)
    assert rows[2][3:5] == next_term
    assert rows[2][-1] == ("3000" if term == "monthly" else "33000")


@pytest.mark.parametrize("term", ["monthly", "annual"])
def test_anniversary_downgrade_at_the_terms_end(term: TermLength) -> None:
    requests = [
        start(jst(2020, 10, 13), term, "ann-pro"),
        Request(2, "change", jst(2020, 11, 1), content=Content.of("ann", {})),
    ]
    until = jst(2021, 10, 13)
    sim = run("anniversary", requests, until)
    rows = issued(sim, until)
    assert [r[0] for r in rows] == ["term_fee"] * len(rows)  # no refund
    renewal = D(2020, 11, 13) if term == "monthly" else D(2021, 10, 13)
    assert [r[-1] for r in rows if r[1] >= renewal] == [
        "1000" if term == "monthly" else "11000"
    ] * (12 if term == "monthly" else 1)
    assert local_date(sim.effective[2], TOKYO) == renewal


def test_anniversary_monthly_to_annual_refunds_the_unused_month() -> None:
    requests = [
        start(jst(2020, 10, 11), "monthly", "ann"),
        Request(2, "switch", jst(2020, 10, 15), term="annual"),
    ]
    until = jst(2021, 10, 15)
    rows = issued(run("anniversary", requests, until), until)
    assert rows == [
        ("term_fee", D(2020, 10, 11), D(2020, 10, 11), D(2020, 10, 11), D(2020, 11, 10), "1000"),
        # 1,000 x 27 / 31 days = 870.97, refunded rounded down.
        ("refund", D(2020, 10, 15), D(2020, 10, 15), D(2020, 10, 15), D(2020, 11, 10), "-870"),
        ("term_fee", D(2020, 10, 15), D(2020, 10, 15), D(2020, 10, 15), D(2021, 10, 14), "11000"),
        ("term_fee", D(2021, 10, 15), D(2021, 10, 15), D(2021, 10, 15), D(2022, 10, 14), "11000"),
    ]


def test_anniversary_annual_to_monthly_refunds_nothing() -> None:
    requests = [
        start(jst(2020, 10, 11), "annual", "ann"),
        Request(2, "switch", jst(2020, 10, 15), term="monthly"),
    ]
    until = jst(2020, 11, 15)
    rows = issued(run("anniversary", requests, until), until)
    assert rows == [
        ("term_fee", D(2020, 10, 11), D(2020, 10, 11), D(2020, 10, 11), D(2021, 10, 10), "11000"),
        ("term_fee", D(2020, 10, 15), D(2020, 10, 15), D(2020, 10, 15), D(2020, 11, 14), "1000"),
        ("term_fee", D(2020, 11, 15), D(2020, 11, 15), D(2020, 11, 15), D(2020, 12, 14), "1000"),
    ]


def test_anniversary_upgrade_from_a_contract_worth_nothing_starts_a_new_term() -> None:
    requests = [
        start(jst(2020, 10, 13), "monthly", "ann-free"),
        Request(2, "change", jst(2020, 11, 1, 12), content=Content.of("ann", {})),
    ]
    until = jst(2020, 12, 1, 12)
    sim = run("anniversary", requests, until)
    assert issued(sim, until) == [
        ("term_fee", D(2020, 10, 13), D(2020, 10, 13), D(2020, 10, 13), D(2020, 11, 12), "0"),
        ("term_fee", D(2020, 11, 1), D(2020, 11, 1), D(2020, 11, 1), D(2020, 11, 30), "1000"),
        ("term_fee", D(2020, 12, 1), D(2020, 12, 1), D(2020, 12, 1), D(2020, 12, 31), "1000"),
    ]
    assert sim.outcomes[1].effect == "restart"
    assert sim.terms[0].ends_at == jst(2020, 11, 1, 12)  # cut


# --- decisions and edges --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "effective"),
    [
        (jst(2018, 9, 20, 23, 59, 59), jst(2018, 10, 1)),
        (jst(2018, 9, 21), jst(2018, 11, 1)),
    ],
)
def test_a_calendar_decrease_around_the_20th(requested: datetime, effective: datetime) -> None:
    requests = [
        start(jst(2018, 8, 10), "monthly", "cal", **{"lte-m": 5}),
        Request(2, "change", requested, content=Content.of("cal", {"lte-m": 2})),
    ]
    sim = run("calendar", requests, requested)
    assert sim.effective_at(2) == effective
    sim.advance(jst(2018, 11, 1))
    fees = {local_date(c.issued_at, TOKYO): c.amount for c in sim.charges}
    assert fees == {
        D(2018, 9, 1): Decimal(1500),
        D(2018, 10, 1): Decimal(1200 if effective.month == 10 else 1500),
        D(2018, 11, 1): Decimal(1200),
    }


def test_a_calendar_increase_in_the_free_period_is_in_the_first_fee() -> None:
    requests = [
        start(jst(2017, 10, 3), "annual", "cal"),
        Request(2, "change", jst(2017, 10, 30), content=Content.of("cal-pro", {})),
    ]
    sim = run("calendar", requests, jst(2017, 11, 1))
    assert [(c.kind, c.amount) for c in sim.charges] == [("term_fee", Decimal(34000))]


@pytest.mark.parametrize(
    ("at", "months"),
    [
        (jst(2018, 9, 30, 23, 59, 59), None),  # the term's last second: no whole month left
        (jst(2018, 9, 1), 1),  # the last month's first instant: that month
        (jst(2017, 10, 1), 12),  # the term's first instant: all of it
    ],
)
def test_a_calendar_increase_late_in_a_term(at: datetime, months: int | None) -> None:
    requests = [
        start(jst(2017, 9, 15), "annual", "cal"),
        Request(2, "change", at, content=Content.of("cal-pro", {})),
    ]
    sim = run("calendar", requests, jst(2018, 10, 1))
    prorations = [c for c in sim.charges if c.kind == "proration"]
    if months is None:
        assert prorations == []
    else:
        assert [(c.part, c.amount) for c in prorations] == [(months, Decimal(24000 * months // 12))]
    assert sim.charges[-1].amount == Decimal(34000)  # the renewal at the new price


def test_an_anniversary_upgrade_in_the_last_second_is_charged_zero() -> None:
    requests = [
        start(jst(2020, 10, 13), "monthly", "ann"),
        Request(2, "change", jst(2020, 11, 12, 23, 59, 59), content=Content.of("ann-pro", {})),
    ]
    sim = run("anniversary", requests, jst(2020, 11, 13))
    proration = [c for c in sim.charges if c.kind == "proration"]
    assert [(c.part, c.whole, c.amount) for c in proration] == [(1, 31 * 86400, Decimal(0))]
    assert sim.charges[-1].amount == Decimal(3000)


def test_a_later_decrease_replaces_a_waiting_one_and_an_increase_voids_it() -> None:
    requests = [
        start(jst(2018, 8, 10), "monthly", "cal", **{"lte-m": 10}),
        Request(2, "change", jst(2018, 9, 2), content=Content.of("cal", {"lte-m": 5})),
        Request(3, "change", jst(2018, 9, 3), content=Content.of("cal", {"lte-m": 3})),
    ]
    sim = run("calendar", requests, jst(2018, 9, 3))
    assert [p.request.id for p in sim.pending] == [3]
    sim.apply(Request(4, "change", jst(2018, 9, 4), content=Content.of("cal", {"lte-m": 12})))
    assert sim.pending == []
    sim.advance(jst(2018, 10, 1))
    assert sim.charges[-1].amount == Decimal(1000 + 10 * 100 + 2 * 80)


def test_unchanged_requests_change_nothing() -> None:
    sim = run("calendar", [start(jst(2018, 8, 10), "monthly", "cal")], jst(2018, 8, 10))
    assert not sim.apply(Request(2, "switch", jst(2018, 8, 11), term="monthly")).changed
    assert not sim.apply(
        Request(3, "change", jst(2018, 8, 11), content=Content.of("cal", {}))
    ).changed
    assert sim.apply(Request(4, "cancel", jst(2018, 8, 12))).changed
    assert not sim.apply(Request(5, "cancel", jst(2018, 8, 13))).changed


def test_refusals() -> None:
    sim = run("calendar", [start(jst(2018, 8, 10), "monthly", "cal")], jst(2018, 8, 10))
    with pytest.raises(ConflictError) as before:
        sim.apply(Request(2, "cancel", jst(2018, 8, 9)))
    assert before.value.field == "at"
    with pytest.raises(InvalidError) as too_early:
        # Requested on 10 September (in time for September's end): September at the earliest.
        sim.apply(Request(3, "cancel", jst(2018, 9, 10), end_after=D(2018, 8, 1)))
    assert too_early.value.field == "end_after"
    assert "2018-09" in str(too_early.value)
    sim.apply(Request(4, "cancel", jst(2018, 9, 10)))
    with pytest.raises(ConflictError) as cancelled:
        sim.apply(Request(5, "switch", jst(2018, 9, 11), term="annual"))
    assert cancelled.value.field == "term"
    with pytest.raises(ConflictError) as ended:
        sim.apply(Request(6, "change", jst(2018, 10, 1), content=Content.of("cal-pro", {})))
    assert ended.value.field == "contract"
    with pytest.raises(InvalidError) as no_class:
        value(Content.of("cal", {"wifi": 1}), "monthly")
    assert no_class.value.field == "commit"


def test_dst_calendar_account_in_new_york() -> None:
    ny = ZoneInfo("America/New_York")
    requests = [
        Request(
            1,
            "start",
            datetime(2021, 2, 14, 23, tzinfo=ny),
            term="monthly",
            content=Content.of("cal", {}),
        ),
        # 23:59:59 on 20 March in New York (already the 21st in UTC): in time.
        Request(2, "cancel", datetime(2021, 3, 20, 23, 59, 59, tzinfo=ny)),
    ]
    sim = Simulation("calendar", "America/New_York", "JPY", value, requests[0])
    sim.apply(requests[1])
    sim.advance(datetime(2021, 6, 1, tzinfo=ny))
    assert [c.starts_at for c in sim.charges] == [datetime(2021, 3, 1, tzinfo=ny)]
    assert sim.ended_at == datetime(2021, 4, 1, tzinfo=ny)
    assert seconds_between(sim.charges[0].starts_at, sim.ended_at) == (31 * 24 - 1) * 3600
