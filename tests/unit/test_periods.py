"""Contract periods (metering/periods.py): the seeds' example tables first, row by row, then
the edges issue 12 names. Dates are read in the account's zone (Asia/Tokyo, as the seeds)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from metering.periods import (
    TermLength,
    add_months,
    deadline,
    due_date,
    end_of_following_month,
    first_of_month_on_or_after,
    first_term_start,
    free_period,
    last_day,
    local_date,
    months_remaining,
    next_month_start,
    prorate,
    seconds_between,
    takes_effect,
    term_at,
    term_end,
)

TOKYO = "Asia/Tokyo"
NEW_YORK = "America/New_York"


def jst(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, ss, tzinfo=ZoneInfo(TOKYO))


def ny(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, ss, tzinfo=ZoneInfo(NEW_YORK))


def days(start: datetime, end: datetime, tz: str = TOKYO) -> tuple[date, date]:
    """A period as the seeds write it: first and last local day."""
    return local_date(start, tz), last_day(start, end, tz)


# --- seed 003 (calendar) --------------------------------------------------------------------

# 初回申込日 | 無償利用期間 | 請求書送信日 | 支払期限 | 初回契約期間
SIGN_UPS = [
    # 例:月額契約の請求サイクル
    (
        "monthly",
        jst(2017, 10, 3, 14, 30),
        (date(2017, 10, 3), date(2017, 10, 31)),
        date(2017, 11, 1),
        date(2017, 12, 31),
        (date(2017, 11, 1), date(2017, 11, 30)),
    ),
    # 例:年額契約の請求サイクル
    (
        "annual",
        jst(2017, 10, 3, 14, 30),
        (date(2017, 10, 3), date(2017, 10, 31)),
        date(2017, 11, 1),
        date(2017, 12, 31),
        (date(2017, 11, 1), date(2018, 10, 31)),
    ),
]


@pytest.mark.parametrize(("length", "at", "free", "invoice", "due", "first"), SIGN_UPS)
def test_calendar_sign_up(
    length: TermLength,
    at: datetime,
    free: tuple[date, date],
    invoice: date,
    due: date,
    first: tuple[date, date],
) -> None:
    start, end = free_period(at, TOKYO)
    assert days(start, end) == free
    term_start = first_term_start("calendar", at, TOKYO)
    assert term_start == end == jst(2017, 11, 1)
    assert local_date(term_start, TOKYO) == invoice
    assert due_date("calendar", term_start, TOKYO) == due
    assert days(term_start, term_end(term_start, length, TOKYO)) == first


def test_calendar_increase_in_an_annual_term() -> None:
    """例:年額契約中に利用料金が変動する場合: 契約期間 2017/10/01 - 2018/09/30, 変更日
    2018/03/20, 変更適用日 2018/04/01, 支払期限 2018/5末, 変更適用期間 2018/04/01 - 2018/09/30
    (6か月分)."""
    term_start = jst(2017, 10, 1)
    end = term_end(term_start, "annual", TOKYO)
    assert days(term_start, end) == (date(2017, 10, 1), date(2018, 9, 30))
    changed = jst(2018, 3, 20, 11)
    applies = first_of_month_on_or_after(changed, TOKYO)
    assert applies == jst(2018, 4, 1)
    assert due_date("calendar", applies, TOKYO) == date(2018, 5, 31)
    assert days(applies, end) == (date(2018, 4, 1), date(2018, 9, 30))
    assert months_remaining(changed, end, TOKYO) == 6
    # The annual price difference x 6 / 12, rounded down.
    assert prorate(Decimal(12001), 6, 12, "JPY") == Decimal(6000)


# 変更申込日 | 変更日 | 支払期限 | 切替後の契約期間 | 次契約の請求書送信日
SWITCHES = [
    # 月額契約中(満了日:2017/11/30)に年額契約へ変更: the first term of a sign-up in October.
    (
        (jst(2017, 11, 1), "monthly"),
        jst(2017, 10, 20, 9),
        "annual",
        date(2017, 12, 1),
        date(2018, 1, 31),
        (date(2017, 12, 1), date(2018, 11, 30)),
        date(2018, 12, 1),
    ),
    # 年額契約中(満了日:2017/12/31)に月額契約へ変更
    (
        (jst(2017, 1, 1), "annual"),
        jst(2017, 11, 20, 9),
        "monthly",
        date(2018, 1, 1),
        date(2018, 2, 28),
        (date(2018, 1, 1), date(2018, 1, 31)),
        date(2018, 2, 1),
    ),
]


@pytest.mark.parametrize(
    ("term", "requested", "to", "changes_on", "due", "new_term", "next_invoice"), SWITCHES
)
def test_calendar_term_switch(
    term: tuple[datetime, TermLength],
    requested: datetime,
    to: TermLength,
    changes_on: date,
    due: date,
    new_term: tuple[date, date],
    next_invoice: date,
) -> None:
    start, length = term
    end = term_end(start, length, TOKYO)
    following = term_end(end, length, TOKYO)
    effective = takes_effect(requested, start, end, following, TOKYO)
    assert effective == end
    assert local_date(effective, TOKYO) == changes_on
    assert due_date("calendar", effective, TOKYO) == due
    switched_end = term_end(effective, to, TOKYO)
    assert days(effective, switched_end) == new_term
    assert local_date(switched_end, TOKYO) == next_invoice


# 解約申請日 | 最終請求日 | 支払期限 | 最終契約期間
CANCELLATIONS = [
    # 月額契約中で 2019/3月の解約を希望: in time for November's end, monthly terms to March.
    (
        (jst(2018, 11, 1), "monthly"),
        jst(2018, 11, 20, 17),
        date(2018, 12, 1),
        (2019, 3),
        date(2019, 3, 1),
        date(2019, 4, 30),
        (date(2019, 3, 1), date(2019, 3, 31)),
    ),
    # 年額契約中(満了日:2018/11/30)で 2018/12月の解約を希望: in time for the annual term's
    # end; December is one monthly term.
    (
        (jst(2017, 12, 1), "annual"),
        jst(2018, 10, 20, 17),
        date(2018, 12, 1),
        (2018, 12),
        date(2018, 12, 1),
        date(2019, 1, 31),
        (date(2018, 12, 1), date(2018, 12, 31)),
    ),
]


@pytest.mark.parametrize(
    ("term", "requested", "earliest", "month", "last_invoice", "due", "last_term"),
    CANCELLATIONS,
)
def test_calendar_cancellation(
    term: tuple[datetime, TermLength],
    requested: datetime,
    earliest: date,
    month: tuple[int, int],
    last_invoice: date,
    due: date,
    last_term: tuple[date, date],
) -> None:
    start, length = term
    end = term_end(start, length, TOKYO)
    following = term_end(end, length, TOKYO)
    assert local_date(takes_effect(requested, start, end, following, TOKYO), TOKYO) == earliest
    # The last term is the monthly one of the month asked for.
    last_start = jst(*month, 1)
    _, first, final = term_at(end, "monthly", last_start, TOKYO)
    assert first == last_start
    assert local_date(first, TOKYO) == last_invoice
    assert due_date("calendar", first, TOKYO) == due
    assert days(first, final) == last_term


# --- seed 004 (anniversary) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "payment_days"),
    [
        # 2020年10月13日に申し込み → 2020年10月13日、11月13日、12月13日
        ("monthly", [date(2020, 10, 13), date(2020, 11, 13), date(2020, 12, 13)]),
        # → 2020年10月13日、2021年10月13日、2022年10月13日
        ("annual", [date(2020, 10, 13), date(2021, 10, 13), date(2022, 10, 13)]),
    ],
)
def test_anniversary_payment_days(length: TermLength, payment_days: list[date]) -> None:
    bought = jst(2020, 10, 13, 15, 42, 7)
    assert first_term_start("anniversary", bought, TOKYO) == bought
    step = 1 if length == "monthly" else 12
    renewals = [add_months(bought, n * step, TOKYO) for n in range(3)]
    assert [local_date(r, TOKYO) for r in renewals] == payment_days
    assert [due_date("anniversary", r, TOKYO) for r in renewals] == payment_days
    # Renewed at the time of day it was bought.
    assert {r.astimezone(ZoneInfo(TOKYO)).time() for r in renewals} == {bought.time()}


@pytest.mark.parametrize(
    ("length", "term", "prorated", "next_term"),
    [
        # 月次契約で2020年10月13日〜11月12日の契約期間中、11月1日にアップグレード
        (
            "monthly",
            (date(2020, 10, 13), date(2020, 11, 12)),
            (date(2020, 11, 1), date(2020, 11, 12)),
            (date(2020, 11, 13), date(2020, 12, 12)),
        ),
        # 年次契約で2020年10月13日〜2021年10月12日の契約期間中、2020年11月1日にアップグレード
        (
            "annual",
            (date(2020, 10, 13), date(2021, 10, 12)),
            (date(2020, 11, 1), date(2021, 10, 12)),
            (date(2021, 10, 13), date(2022, 10, 12)),
        ),
    ],
)
def test_anniversary_upgrade_and_downgrade(
    length: TermLength,
    term: tuple[date, date],
    prorated: tuple[date, date],
    next_term: tuple[date, date],
) -> None:
    bought = jst(2020, 10, 13)
    end = term_end(bought, length, TOKYO)
    assert days(bought, end) == term
    upgraded = jst(2020, 11, 1)
    assert days(upgraded, end) == prorated
    # A downgrade (or cancellation) on the same day takes effect at the term's end; the
    # upgrade's full price is charged from then too.
    _, renewal, renewal_end = term_at(bought, length, end, TOKYO)
    assert renewal == end
    assert days(renewal, renewal_end) == next_term


def test_anniversary_upgrade_is_prorated_by_the_second() -> None:
    bought = jst(2020, 10, 13)
    end = term_end(bought, "monthly", TOKYO)
    upgraded = jst(2020, 11, 1)
    remaining, whole = seconds_between(upgraded, end), seconds_between(bought, end)
    assert (remaining, whole) == (12 * 86400, 31 * 86400)
    # (3,000 - 1,000) x 1,036,800 / 2,678,400 = 774.19...: rounded down.
    assert prorate(Decimal(2000), remaining, whole, "JPY") == Decimal(774)
    assert prorate(Decimal("20.00"), remaining, whole, "USD") == Decimal("7.74")


@pytest.mark.parametrize(
    ("term", "switched", "new_length", "new_term", "refunded"),
    [
        # 2020年10月11日〜11月10日(月次)で10月15日に年次へ: 2020年10月15日〜2021年10月14日(年次),
        # 2020年10月15日〜11月10日の未使用分は日割りで返金
        (
            (jst(2020, 10, 11), "monthly"),
            jst(2020, 10, 15),
            "annual",
            (date(2020, 10, 15), date(2021, 10, 14)),
            (date(2020, 10, 15), date(2020, 11, 10)),
        ),
        # 2020年10月11日〜2021年10月10日(年次)で10月15日に月次へ: from 2020-10-15 monthly (the
        # seed prints the term's end as 2021年11月14日, a year off: a monthly term from 15
        # October 2020 ends on 14 November 2020); nothing refunded.
        (
            (jst(2020, 10, 11), "annual"),
            jst(2020, 10, 15),
            "monthly",
            (date(2020, 10, 15), date(2020, 11, 14)),
            None,
        ),
    ],
)
def test_anniversary_term_switch(
    term: tuple[datetime, TermLength],
    switched: datetime,
    new_length: TermLength,
    new_term: tuple[date, date],
    refunded: tuple[date, date] | None,
) -> None:
    start, length = term
    end = term_end(start, length, TOKYO)
    assert days(switched, term_end(switched, new_length, TOKYO)) == new_term
    if refunded is not None:
        assert days(switched, end) == refunded
        # 1,000 a month: 27 of its 31 days back (870.96), rounded down.
        share = prorate(
            Decimal(1000), seconds_between(switched, end), seconds_between(start, end), "JPY"
        )
        assert share == Decimal(870)


# --- edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "effective"),
    [
        (jst(2018, 9, 20, 23, 59, 59), jst(2018, 10, 1)),  # the 20th's last second: in time
        (jst(2018, 9, 21), jst(2018, 11, 1)),  # the 21st's first instant: one term later
        (jst(2018, 9, 1), jst(2018, 10, 1)),
        (jst(2018, 8, 31, 23, 59, 59), jst(2018, 10, 1)),  # in the free period of a sign-up
        (jst(2018, 9, 30, 23, 59, 59), jst(2018, 11, 1)),
    ],
)
def test_the_deadline_is_the_end_of_the_20th_monthly(
    requested: datetime, effective: datetime
) -> None:
    start = jst(2018, 9, 1)
    end = term_end(start, "monthly", TOKYO)
    assert deadline(start, end, TOKYO) == jst(2018, 9, 21)
    following = term_end(end, "monthly", TOKYO)
    assert takes_effect(requested, start, end, following, TOKYO) == effective


@pytest.mark.parametrize(
    ("requested", "effective"),
    [
        (jst(2018, 5, 25), jst(2019, 4, 1)),  # not the term's last month: in time
        (jst(2019, 3, 20, 23, 59, 59), jst(2019, 4, 1)),
        (jst(2019, 3, 21), jst(2020, 4, 1)),
        (jst(2019, 3, 31, 23, 59, 59), jst(2020, 4, 1)),
    ],
)
def test_the_deadline_is_in_an_annual_terms_last_month(
    requested: datetime, effective: datetime
) -> None:
    start = jst(2018, 4, 1)
    end = term_end(start, "annual", TOKYO)
    assert deadline(start, end, TOKYO) == jst(2019, 3, 21)
    assert takes_effect(requested, start, end, term_end(end, "annual", TOKYO), TOKYO) == effective


@pytest.mark.parametrize(
    ("anchor", "length", "renewals"),
    [
        # The 31st falls back to the month's last day and returns to the 31st.
        (
            jst(2021, 1, 31, 10),
            "monthly",
            [
                jst(2021, 1, 31, 10),
                jst(2021, 2, 28, 10),
                jst(2021, 3, 31, 10),
                jst(2021, 4, 30, 10),
                jst(2021, 5, 31, 10),
            ],
        ),
        # February in a leap year.
        (
            jst(2020, 1, 31, 10),
            "monthly",
            [jst(2020, 1, 31, 10), jst(2020, 2, 29, 10), jst(2020, 3, 31, 10)],
        ),
        (
            jst(2020, 2, 29, 10),
            "annual",
            [
                jst(2020, 2, 29, 10),
                jst(2021, 2, 28, 10),
                jst(2022, 2, 28, 10),
                jst(2023, 2, 28, 10),
                jst(2024, 2, 29, 10),
            ],
        ),
        (
            jst(2020, 2, 29, 10),
            "monthly",
            [jst(2020, 2, 29, 10), jst(2020, 3, 29, 10), jst(2020, 4, 29, 10)],
        ),
        (jst(2019, 12, 31), "monthly", [jst(2019, 12, 31), jst(2020, 1, 31), jst(2020, 2, 29)]),
        (jst(2020, 8, 31), "annual", [jst(2020, 8, 31), jst(2021, 8, 31)]),
    ],
)
def test_the_anniversary_day_rule(
    anchor: datetime, length: TermLength, renewals: list[datetime]
) -> None:
    step = 1 if length == "monthly" else 12
    assert [add_months(anchor, n * step, TOKYO) for n in range(len(renewals))] == renewals
    for n, start in enumerate(renewals[:-1]):
        # The term holding any instant of it, found from the anchor.
        for at in (start, renewals[n + 1] - (renewals[n + 1] - start) / 2):
            assert term_at(anchor, length, at, TOKYO) == (n, start, renewals[n + 1])
        assert term_at(anchor, length, renewals[n + 1], TOKYO)[0] == n + 1


def test_a_term_on_the_31st_is_prorated_over_its_own_length() -> None:
    # 31 January to 28 February 2021: 28 days; an upgrade on 14 February has 14 left.
    anchor = jst(2021, 1, 31)
    index, start, end = term_at(anchor, "monthly", jst(2021, 2, 14), TOKYO)
    assert (index, start, end) == (0, anchor, jst(2021, 2, 28))
    assert days(start, end) == (date(2021, 1, 31), date(2021, 2, 27))
    remaining, whole = seconds_between(jst(2021, 2, 14), end), seconds_between(start, end)
    assert (remaining, whole) == (14 * 86400, 28 * 86400)
    assert prorate(Decimal(1000), remaining, whole, "JPY") == Decimal(500)


def test_february_in_a_leap_year() -> None:
    # Calendar: February 2020 has 29 days; its deadline is still the end of the 20th.
    start = jst(2020, 2, 1)
    end = term_end(start, "monthly", TOKYO)
    assert days(start, end) == (date(2020, 2, 1), date(2020, 2, 29))
    assert deadline(start, end, TOKYO) == jst(2020, 2, 21)
    assert due_date("calendar", jst(2020, 1, 1), TOKYO) == date(2020, 2, 29)
    assert due_date("calendar", jst(2019, 1, 1), TOKYO) == date(2019, 2, 28)
    # Anniversary: a month from 29 January 2020 is 29 February; its seconds are 31 days'.
    bought = jst(2020, 1, 29)
    assert term_end(bought, "monthly", TOKYO) == jst(2020, 2, 29)
    assert seconds_between(jst(2020, 2, 29), term_end(jst(2020, 2, 29), "monthly", TOKYO)) == (
        29 * 86400
    )
    # A year from 1 March 2019 holds 29 February 2020: 366 days.
    year = jst(2019, 3, 1)
    assert seconds_between(year, term_end(year, "annual", TOKYO)) == 366 * 86400


@pytest.mark.parametrize(
    ("length", "whole", "difference", "charged"),
    [
        ("monthly", 31 * 86400, "1000000", "0"),  # 0.37: rounded down to nothing
        ("monthly", 31 * 86400, "5000000", "1"),  # 1.87
        ("annual", 365 * 86400, "100000000", "3"),  # 3.17
        ("monthly", 31 * 86400, "1000.00", "0.00"),
    ],
)
def test_an_upgrade_in_the_last_second_of_a_term(
    length: TermLength, whole: int, difference: str, charged: str
) -> None:
    bought = jst(2020, 10, 13)
    end = term_end(bought, length, TOKYO)
    last_second = end - timedelta(seconds=1)
    assert seconds_between(last_second, end) == 1
    assert seconds_between(bought, end) == whole
    currency = "USD" if "." in difference else "JPY"
    assert prorate(Decimal(difference), 1, whole, currency) == Decimal(charged)
    # Bought at midnight, the last second is on the day before the renewal day.
    assert days(last_second, end) == (local_date(last_second, TOKYO),) * 2
    # Bought at 10:00, the last second is on the renewal day itself: the period is that one
    # day, not one that ends the day before it starts.
    at_ten = term_end(jst(2020, 10, 13, 10), length, TOKYO)
    assert days(at_ten - timedelta(seconds=1), at_ten) == (local_date(at_ten, TOKYO),) * 2


def test_an_upgrade_in_the_last_second_of_a_calendar_term_is_charged_for_no_month() -> None:
    end = jst(2018, 10, 1)
    assert months_remaining(jst(2018, 9, 30, 23, 59, 59), end, TOKYO) == 0
    # At a month's very first instant it counts that month (as a plan change does, P6).
    assert months_remaining(jst(2018, 9, 1), end, TOKYO) == 1
    assert months_remaining(jst(2018, 9, 1, 0, 0, 1), end, TOKYO) == 0
    assert months_remaining(jst(2017, 10, 1), end, TOKYO) == 12


@pytest.mark.parametrize(
    ("month_start", "month_end", "hours"),
    [
        # March 2021: DST starts on the 14th (02:00 EST -> 03:00 EDT), one hour less.
        (ny(2021, 3, 1), ny(2021, 4, 1), 31 * 24 - 1),
        # November 2021: DST ends on the 7th (02:00 EDT -> 01:00 EST), one hour more.
        (ny(2021, 11, 1), ny(2021, 12, 1), 30 * 24 + 1),
        (ny(2021, 6, 1), ny(2021, 7, 1), 30 * 24),
    ],
)
def test_dst_in_new_york_for_a_calendar_account(
    month_start: datetime, month_end: datetime, hours: int
) -> None:
    assert term_end(month_start, "monthly", NEW_YORK) == month_end
    assert seconds_between(month_start, month_end) == hours * 3600
    # Local midnights, whichever offset they have.
    assert month_start.astimezone(UTC).hour in (4, 5)
    assert next_month_start(month_start, NEW_YORK) == month_end
    assert next_month_start(month_end - (month_end - month_start) / 2, NEW_YORK) == month_end
    cutoff = deadline(month_start, month_end, NEW_YORK)
    assert cutoff == ny(month_start.year, month_start.month, 21)
    following = term_end(month_end, "monthly", NEW_YORK)
    # 23:59:59 on the 20th in New York is in time, though in UTC it is already the 21st.
    late_evening = ny(month_start.year, month_start.month, 20, 23, 59, 59)
    assert late_evening.astimezone(UTC).day == 21
    assert takes_effect(late_evening, month_start, month_end, following, NEW_YORK) == month_end
    assert takes_effect(cutoff, month_start, month_end, following, NEW_YORK) == following


def test_dst_in_new_york_annual_term_and_due_dates() -> None:
    start = ny(2021, 3, 1)
    end = term_end(start, "annual", NEW_YORK)
    assert end == ny(2022, 3, 1)
    assert months_remaining(ny(2021, 11, 7, 1, 30), end, NEW_YORK) == 3  # Dec, Jan, Feb
    # Issued at local midnight on the 1st; in UTC that is still the 31st (or 30th).
    issued = ny(2021, 12, 1)
    assert issued.astimezone(UTC).date() == date(2021, 12, 1)
    assert due_date("calendar", ny(2021, 11, 1), NEW_YORK) == date(2021, 12, 31)
    # A free period that ends at a DST month's first instant.
    assert free_period(ny(2021, 2, 14, 23), NEW_YORK) == (ny(2021, 2, 14, 23), ny(2021, 3, 1))


def test_a_renewal_in_a_dst_gap_happens_after_the_gap() -> None:
    # Bought at 02:30 on 14 February 2021; 14 March 02:30 does not exist in New York.
    bought = ny(2021, 2, 14, 2, 30)
    renewal = add_months(bought, 1, NEW_YORK)
    assert renewal.astimezone(UTC) == datetime(2021, 3, 14, 7, 30, tzinfo=UTC)  # 03:30 EDT
    assert add_months(bought, 2, NEW_YORK) == ny(2021, 4, 14, 2, 30)


@pytest.mark.parametrize(
    ("day", "due"),
    [
        (date(2017, 11, 1), date(2017, 12, 31)),
        (date(2017, 12, 1), date(2018, 1, 31)),
        (date(2018, 1, 1), date(2018, 2, 28)),
        (date(2018, 4, 1), date(2018, 5, 31)),
        (date(2018, 5, 31), date(2018, 6, 30)),
    ],
)
def test_due_at_the_end_of_the_following_month(day: date, due: date) -> None:
    assert end_of_following_month(day) == due


@pytest.mark.parametrize(
    ("amount", "part", "whole", "currency", "expected"),
    [
        ("12000", 6, 12, "JPY", "6000"),
        ("1000", 1, 3, "JPY", "333"),  # 333.3
        ("1000", 2, 3, "JPY", "666"),  # 666.6: down, not to the nearest
        ("-1000", 2, 3, "JPY", "-666"),  # a refund: toward zero too
        ("10.00", 2, 3, "USD", "6.66"),
        ("10.000", 2, 3, "KWD", "6.666"),
        ("1000", 0, 3, "JPY", "0"),
        ("1000", 3, 3, "JPY", "1000"),
    ],
)
def test_prorate(amount: str, part: int, whole: int, currency: str, expected: str) -> None:
    result = prorate(Decimal(amount), part, whole, currency)
    assert result == Decimal(expected)
    assert str(result) == expected


@pytest.mark.parametrize(
    ("amount", "part", "whole", "currency", "error"),
    [
        ("1000", 4, 3, "JPY", ValueError),
        ("1000", 1, 0, "JPY", ValueError),
        ("10.5", 1, 2, "JPY", ValueError),  # not a whole yen
        ("10", 1, 2, "XXX", ValueError),
    ],
)
def test_prorate_refuses(
    amount: str, part: int, whole: int, currency: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        prorate(Decimal(amount), part, whole, currency)


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_month_start(datetime(2020, 1, 1), TOKYO)  # noqa: DTZ001
