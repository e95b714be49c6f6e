"""Contract periods (issue 12; seeds 003 and 004): terms, deadlines, due dates, proration.

Pure: no database, settings or clock. Instants are timezone-aware (those computed here are
returned in UTC); every date rule is read in the account's time zone (an IANA name), so a
term that spans a DST change is as long as the zone says (743 or 745 hours for a month in
America/New_York), never 24 h x days.

Two policies, because the two source pages differ:

- ``calendar`` (seed 003): terms start on the 1st at local midnight; the time between the
  purchase and the next 1st is a free period; a cancellation, decrease or term switch must be
  requested by the end of the 20th of the term's last month, else it waits one more term;
  an increase is charged for the whole months from the next 1st to the term's end; charges
  are due at the end of the month after the one they are issued in.
- ``anniversary`` (seed 004): a term starts at the purchase instant and renews on the same
  day (and local time) each month or year; proration is by the second (Unix time); a charge
  is paid by card when it is issued, so it is due that day.

The anniversary day rule: every renewal is counted from the term's anchor (its first
instant), never from the previous renewal, so a term anchored on the 31st renews on the
last day of a shorter month and on the 31st again in the months that have one (Jan 31,
Feb 28, Mar 31, Apr 30, ...), and an annual term anchored on Feb 29 renews on Feb 28 in
common years and on Feb 29 again in leap years. A renewal whose local time does not exist
(skipped by a DST change) happens at the first instant after the gap.

Money is ``Decimal``. Prorated amounts are rounded toward zero to the currency's minor unit
(SPEC: "rounded down"), so the customer is never charged, nor refunded, a fraction more
than the exact share.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_DOWN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from types import MappingProxyType
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from devmeter.errors import InvalidError
from metering.catalog import CURRENCY_MINOR_UNITS

__all__ = [
    "DEADLINE_DAY",
    "MONTHS",
    "POLICIES",
    "TERMS",
    "Policy",
    "TermLength",
    "add_months",
    "deadline",
    "due_date",
    "end_of_following_month",
    "first_of_month_on_or_after",
    "first_term_start",
    "free_period",
    "last_day",
    "local_date",
    "month_start",
    "months_between",
    "months_remaining",
    "next_month_start",
    "prorate",
    "seconds_between",
    "takes_effect",
    "term_at",
    "term_end",
    "zone",
]

Policy = Literal["calendar", "anniversary"]
TermLength = Literal["monthly", "annual"]
POLICIES: Final[tuple[Policy, ...]] = ("calendar", "anniversary")
TERMS: Final[tuple[TermLength, ...]] = ("monthly", "annual")
#: Months in a term.
MONTHS: Final[Mapping[TermLength, int]] = MappingProxyType({"monthly": 1, "annual": 12})
#: Calendar policy: the last day of a term's last month on which a cancellation, decrease or
#: term switch still takes effect at the term's end (through its last instant, local time).
DEADLINE_DAY: Final = 20

# Quantize only; rounding there is the point, so Inexact does not trap.
_ROUND: Final = Context(prec=60, traps=[InvalidOperation, DivisionByZero, Overflow])
_ONE_SECOND: Final = timedelta(seconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@functools.cache
def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidError(
            f"unknown time zone {tz!r} (expected an IANA name such as Asia/Tokyo)",
            field="timezone",
        ) from exc


def _aware(at: datetime, what: str = "instant") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {at.isoformat()}")
    return at


def _local_instant(year: int, month: int, day: int, wall: time, tz: str) -> datetime:
    """``year-month-day`` at the local ``wall`` time, as an instant (in UTC).

    A wall time a DST change skips is read at the offset before the change (fold=0), which
    puts it as far after the gap as it was into it. In UTC, because aware datetimes that
    share a tzinfo compare and subtract by wall time, fold ignored: in the hour a DST end
    repeats, two instants would compare equal.
    """
    return datetime.combine(date(year, month, day), wall, tzinfo=zone(tz)).astimezone(UTC)


def local_date(at: datetime, tz: str) -> date:
    return _aware(at).astimezone(zone(tz)).date()


def month_start(year: int, month: int, tz: str) -> datetime:
    """The first instant of a local month (its 1st at midnight, or the first instant after a
    gap at midnight)."""
    return _local_instant(year, month, 1, time(0), tz)


def next_month_start(at: datetime, tz: str) -> datetime:
    """The first instant of the month after ``at``'s local month."""
    local = _aware(at).astimezone(zone(tz))
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return month_start(year, month, tz)


def first_of_month_on_or_after(at: datetime, tz: str) -> datetime:
    """``at`` itself when it is a month's first instant, else the next month's first instant.

    Where a calendar increase is charged from: an increase at the very first instant of a month
    is charged for that month too (as SPEC P6 prices a plan change at a month's first instant
    from that month); one a second later, from the next month.
    """
    local = _aware(at).astimezone(zone(tz))
    first = month_start(local.year, local.month, tz)
    return first if first == at else next_month_start(at, tz)


def add_months(anchor: datetime, months: int, tz: str) -> datetime:
    """``anchor`` plus ``months`` calendar months, same local day and time (the anniversary
    day rule in this module's docstring: the day falls back to a shorter month's last day)."""
    local = _aware(anchor, "anchor").astimezone(zone(tz))
    index = local.year * 12 + (local.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return _local_instant(year, month, day, local.time(), tz)


def term_end(start: datetime, length: TermLength, tz: str) -> datetime:
    """The end (exclusive) of a term of ``length`` that starts at ``start``, when ``start`` is
    its anchor. A later term of the same run is ``term_at``'s: counted from the anchor."""
    return add_months(start, MONTHS[length], tz)


def term_at(
    anchor: datetime, length: TermLength, at: datetime, tz: str
) -> tuple[int, datetime, datetime]:
    """The term of a run anchored at ``anchor`` that holds ``at``: ``(index, start, end)``.

    Index 0 is the term that starts at the anchor. Before the anchor there is no term.
    """
    if _aware(at) < anchor:
        raise ValueError(f"{at.isoformat()} is before the first term ({anchor.isoformat()})")
    step = MONTHS[length]
    local_anchor, local_at = anchor.astimezone(zone(tz)), at.astimezone(zone(tz))
    # A first guess from the calendar months between them, corrected by at most one term
    # either way (the day and time of day decide whether the last renewal has happened).
    index = max(
        0,
        ((local_at.year - local_anchor.year) * 12 + local_at.month - local_anchor.month) // step,
    )
    while index > 0 and add_months(anchor, index * step, tz) > at:
        index -= 1
    while add_months(anchor, (index + 1) * step, tz) <= at:
        index += 1
    return index, add_months(anchor, index * step, tz), add_months(anchor, (index + 1) * step, tz)


def free_period(started_at: datetime, tz: str) -> tuple[datetime, datetime]:
    """Calendar policy: ``[purchase, first term start)``: the rest of the purchase month is free,
    even when the purchase is at its very first instant (the month is the free period)."""
    return started_at, next_month_start(started_at, tz)


def first_term_start(policy: Policy, started_at: datetime, tz: str) -> datetime:
    if policy == "calendar":
        return free_period(started_at, tz)[1]
    return _aware(started_at)


def last_day(start: datetime, end: datetime, tz: str) -> date:
    """The last day of ``[start, end)`` as the seeds write it: the day before the local day of
    ``end`` ("2020-10-13 - 2020-11-12" for a term that renews on 13 November, whatever the time
    of day), but never before the first day (an upgrade in a term's last second)."""
    return max(local_date(start, tz), local_date(end, tz) - timedelta(days=1))


def deadline(term_start: datetime, term_end: datetime, tz: str) -> datetime:
    """Calendar policy: the first instant too late for a cancellation, decrease or term switch
    to take effect at this term's end: midnight after the 20th of the term's last month."""
    if term_end <= term_start:
        raise ValueError("a term ends after it starts")
    last = (_aware(term_end) - timedelta(microseconds=1)).astimezone(zone(tz))
    return _local_instant(last.year, last.month, DEADLINE_DAY + 1, time(0), tz)


def takes_effect(
    at: datetime, term_start: datetime, term_end: datetime, following_end: datetime, tz: str
) -> datetime:
    """Calendar policy: when a cancellation, decrease or term switch requested at ``at`` in the
    term ``[term_start, term_end)`` (or before it, in the free period) takes effect: at the
    term's end if requested by its deadline, else at the end of the following term."""
    return term_end if _aware(at) < deadline(term_start, term_end, tz) else following_end


def end_of_following_month(day: date) -> date:
    """ "Month-end closing, payment the following month": the last day of the next month."""
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return date(year, month, calendar.monthrange(year, month)[1])


def due_date(policy: Policy, issued_at: datetime, tz: str) -> date:
    """Calendar: the end of the month after the issue day. Anniversary: the issue day itself
    (seed 004 charges the card when the charge is made)."""
    issued = local_date(issued_at, tz)
    return end_of_following_month(issued) if policy == "calendar" else issued


def months_between(start: datetime, end: datetime, tz: str) -> int:
    """Whole months from one month's first instant to another's."""
    a, b = _aware(start).astimezone(zone(tz)), _aware(end).astimezone(zone(tz))
    months = (b.year - a.year) * 12 + b.month - a.month
    if month_start(a.year, a.month, tz) != start or month_start(b.year, b.month, tz) != end:
        raise ValueError(
            f"whole months run from a month's first instant to another's: "
            f"{start.isoformat()} .. {end.isoformat()} in {tz}"
        )
    return months


def months_remaining(at: datetime, term_end: datetime, tz: str) -> int:
    """Calendar policy: the whole months an increase at ``at`` is charged for, from the next
    month's first instant (or ``at``, if it is one) to the end of a term ending on a 1st."""
    start = first_of_month_on_or_after(at, tz)
    return months_between(start, term_end, tz) if start < term_end else 0


def seconds_between(start: datetime, end: datetime) -> int:
    """Whole seconds of Unix time from ``start`` to ``end`` (each truncated to its second), as
    seed 004 prorates ("Unixtime で秒単位")."""
    # Integer arithmetic on timedeltas: a float timestamp cannot hold every microsecond.
    return (_aware(end) - _EPOCH) // _ONE_SECOND - (_aware(start) - _EPOCH) // _ONE_SECOND


def prorate(amount: Decimal, part: int, whole: int, currency: str) -> Decimal:
    """``amount x part / whole`` rounded toward zero to the currency's minor unit.

    Integer arithmetic in minor units, so the division is exact before the one rounding.
    """
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise TypeError(f"amount must be a finite Decimal, got {amount!r}")
    if whole <= 0 or not 0 <= part <= whole:
        raise ValueError(f"part {part} of whole {whole}: need 0 <= part <= whole and whole > 0")
    try:
        places = CURRENCY_MINOR_UNITS[currency]
    except KeyError:
        raise ValueError(f"unknown currency {currency!r}") from None
    unit = Decimal(1).scaleb(-places)
    minor = amount.scaleb(places, context=_ROUND)
    if minor != minor.to_integral_value(context=_ROUND):
        raise ValueError(f"{amount} {currency} is not a whole number of minor units")
    numerator = int(minor) * part
    # Toward zero, so a refund is rounded down in size just like a charge.
    share = abs(numerator) // whole
    result = Decimal(-share if numerator < 0 else share).scaleb(-places, context=_ROUND)
    quantized = result.quantize(unit, rounding=ROUND_DOWN, context=_ROUND)
    return quantized.copy_abs() if quantized.is_zero() else quantized
