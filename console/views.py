"""What the console's templates show, computed in plain Python: money, local times, charts.

The templates only place these values; Jinja escapes every one of them, so nothing here ever
builds markup. The usage chart is geometry (numbers), drawn as inline SVG by usage.html.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Final
from zoneinfo import ZoneInfo

from metering.daily import DayUsage
from metering.pricing import format_money

_SYMBOLS: Final = {"JPY": "¥", "USD": "$", "EUR": "€", "GBP": "£"}


def display_money(amount: Decimal, currency: str) -> str:
    """For people: "¥3,500", "$1,234.50"; exact digits (format_money), grouped by thousands."""
    plain = format_money(amount, currency)
    sign, digits = ("-", plain[1:]) if plain.startswith("-") else ("", plain)
    whole, dot, fraction = digits.partition(".")
    grouped = f"{int(whole):,}{dot}{fraction}"
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{grouped}" if symbol else f"{sign}{grouped} {currency}"


def display_rate(rate: Decimal) -> str:
    """A tax rate for people: Decimal("0.10") is "10 %", Decimal("0.075") is "7.5 %".

    The space before % is a no-break one, so a narrow column never splits "10" from "%".
    """
    percent = (rate * 100).normalize()
    # normalize() writes 10 as 1E+1: format in fixed point.
    return f"{percent:f}\u00a0%"


def month_label(first: date) -> str:
    """The month a date falls in, spelled out: "October 2026"."""
    return f"{first:%B %Y}"


def local_time(at: datetime | None, tz: str) -> str:
    if at is None:
        return "—"
    return at.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def short_day(day: date) -> str:
    return f"{day:%b} {day.day}"


def previous_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    year, number = (year - 1, 12) if number == 1 else (year, number - 1)
    return f"{year:04d}-{number:02d}"


def next_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return f"{year:04d}-{number:02d}"


# --- the daily usage chart -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    day: date
    x: float
    y: float
    width: float
    height: float
    peak: int
    end_of_day: int
    is_peak: bool


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    device_class: str
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    peak: int
    peak_day: date | None
    #: Where the peak line runs and where the peak day's marker sits.
    peak_y: float
    peak_x: float | None
    peak_label: str


_WIDTH: Final = 720
_HEIGHT: Final = 260
_LEFT: Final = 44.0
_RIGHT: Final = 704.0
_TOP: Final = 30.0
_BOTTOM: Final = 226.0


def _nice_step(top: int) -> int:
    """A 1-2-5 step that cuts ``top`` into about four intervals (integers: devices)."""
    raw = max(top / 4, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * magnitude >= raw:
            return max(int(m * magnitude), 1)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def usage_chart(
    device_class: str,
    days: list[DayUsage],
    first_day: date,
    days_in_month: int,
    peak: int,
    peak_at: datetime | None,
    tz: str,
) -> Chart:
    """Bars of each day's peak Active devices over the whole month (days not yet reached stay
    empty), with the month's peak as a line and its first day marked.

    ``peak`` and ``peak_at`` are the month's usage (final once closed), not recomputed from
    the days, so the chart marks exactly what is billed.
    """
    highest = max([peak, *(d.classes.get(device_class, (0, 0))[0] for d in days)])
    step = _nice_step(max(highest, 1))
    y_max = max(step * math.ceil(max(highest, 1) / step), step)
    plot_height = _BOTTOM - _TOP
    slot = (_RIGHT - _LEFT) / days_in_month

    def y_of(value: int) -> float:
        return round(_BOTTOM - plot_height * value / y_max, 1)

    peak_day = peak_at.astimezone(ZoneInfo(tz)).date() if peak_at is not None and peak else None
    bars = []
    for d in days:
        day_peak, end_of_day = d.classes.get(device_class, (0, 0))
        index = (d.day - first_day).days
        top = y_of(day_peak)
        bars.append(
            Bar(
                day=d.day,
                x=round(_LEFT + slot * index + slot * 0.15, 1),
                y=top,
                width=round(slot * 0.7, 1),
                height=round(_BOTTOM - top, 1),
                peak=day_peak,
                end_of_day=end_of_day,
                is_peak=peak > 0 and day_peak >= peak,
            )
        )
    y_ticks = tuple(Tick(y_of(v), str(v)) for v in range(0, y_max + 1, step))
    labelled = [1, *range(5, days_in_month + 1, 5)]
    if days_in_month - labelled[-1] >= 2:
        labelled.append(days_in_month)
    x_ticks = tuple(Tick(round(_LEFT + slot * (n - 0.5), 1), str(n)) for n in labelled)
    peak_x = (
        round(_LEFT + slot * ((peak_day - first_day).days + 0.5), 1)
        if peak_day is not None and 0 <= (peak_day - first_day).days < days_in_month
        else None
    )
    label = f"Peak {peak}" + (f" on {short_day(peak_day)}" if peak_day is not None else "")
    return Chart(
        device_class=device_class,
        width=_WIDTH,
        height=_HEIGHT,
        left=_LEFT,
        right=_RIGHT,
        top=_TOP,
        bottom=_BOTTOM,
        bars=tuple(bars),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        peak=peak,
        peak_day=peak_day,
        peak_y=y_of(peak),
        peak_x=peak_x,
        peak_label=label,
    )


def month_days(start: datetime, end: datetime, tz: str) -> tuple[date, int]:
    """The month's first local day and its number of days."""
    zone = ZoneInfo(tz)
    first = start.astimezone(zone).date()
    last = (end - timedelta(microseconds=1)).astimezone(zone).date()
    return first, (last - first).days + 1
