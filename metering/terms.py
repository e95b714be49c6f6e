"""A contract's terms and charges, replayed from its requests (issue 12). Pure: no database,
settings or clock; the dates come from metering/periods.py, the prices from a function the
caller passes (``term_value`` on the catalog's plan, in practice).

A contract is what its requests made it: a start, then changes (plan and committed devices),
term switches and a cancellation, each at an instant and in order. Replaying them with the
term boundaries between them gives every term, every charge due and the state at any
instant. Nothing else is stored: a charge is keyed by what it is for (a term's start, a
request), so issuing the charges due up to an instant twice issues each once.

What a request does is decided the first time it is applied and kept with it (``effect``,
and the term values it compared), so replaying it later gives the same result even if the
catalog's prices have moved since:

- a change worth more (or as much) is an increase and applies at once; one worth less is a
  decrease and waits for a term's end, like a cancellation. Under the calendar policy that
  is the current term's end if requested by its deadline, else the following term's; under
  the anniversary policy always the current term's.
- an increase is charged for what has already been charged in advance: calendar, the whole
  months from the next 1st to the term's end (none in the free period: the first term's fee
  is not issued yet and will include it); anniversary, the seconds left in the term. An
  anniversary increase from a contract worth 0 starts a new term at once at full price.
- a term switch waits like a decrease (calendar), or starts a new term at once (anniversary,
  refunding the unused time of a monthly term when it becomes annual).
- a cancellation ends the contract at the term's end it waits for, or, given a last month of
  service, at the first term end from the end of that month on; a calendar annual term that
  would run past that month is renewed as monthly terms instead (seed 003: the annual
  contract "switches to monthly at its end").
- a later request of the same kind replaces one still waiting (a decrease replaces a pending
  decrease, an increase voids it). A term switch is refused while a cancellation waits, as
  is an anniversary restart: either would move the term end the cancellation counts on.

A charge exists for every non-empty period it covers, even when its amount rounds to 0 (an
upgrade in a term's last second); a calendar increase with no whole month left has no period
and no charge (the next term's fee holds it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Final, Literal

from devmeter.errors import ConflictError, InvalidError
from metering.catalog import Plan
from metering.periods import (
    MONTHS,
    Policy,
    TermLength,
    add_months,
    deadline,
    first_of_month_on_or_after,
    first_term_start,
    last_day,
    local_date,
    month_start,
    months_between,
    prorate,
    seconds_between,
)
from metering.pricing import class_amount, format_money, round_money

__all__ = [
    "Charge",
    "ChargeKind",
    "Content",
    "Effect",
    "Outcome",
    "Pending",
    "Request",
    "RequestKind",
    "Simulation",
    "Term",
    "term_value",
]

RequestKind = Literal["start", "change", "switch", "cancel"]
#: now: at the request; restart: at the request, starting a new term; term_end: at the end of
#: the term the request was made in (or, in the free period, of the first term);
#: following_term_end: at the end of the term after that one.
Effect = Literal["now", "restart", "term_end", "following_term_end"]
ChargeKind = Literal["term_fee", "proration", "refund"]
Pricer = Callable[["Content", TermLength], Decimal]

#: A projection stops here: a cancellation's last month at most this many terms away.
_MAX_TERMS: Final = 12 * 200


@dataclass(frozen=True, slots=True)
class Content:
    """What a term bills: the plan's fee for the term and the committed devices per class."""

    plan: str
    commitments: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def of(plan: str, commitments: Mapping[str, int]) -> Content:
        # Sorted and without zeros, so that equal contents compare equal.
        return Content(plan, tuple(sorted((c, n) for c, n in commitments.items() if n > 0)))

    def commitment(self, device_class: str) -> int:
        return dict(self.commitments).get(device_class, 0)


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    kind: RequestKind
    at: datetime
    #: start, switch: the term length asked for.
    term: TermLength | None = None
    #: start, change: the plan and committed devices asked for.
    content: Content | None = None
    #: cancel: the first day of the last month of service, if one was named.
    end_after: date | None = None
    #: Decided when first applied; replayed as stored.
    effect: Effect | None = None
    #: change, switch: the term values compared when the request was first applied (before,
    #: after); the proration or refund is computed from them.
    values: tuple[Decimal, Decimal] | None = None


@dataclass(frozen=True, slots=True)
class Term:
    index: int
    length: TermLength
    starts_at: datetime
    #: The scheduled end; a term cut short by an anniversary restart ends at the cut.
    ends_at: datetime
    #: What the term was billed for when it started.
    content: Content
    fee: Decimal


@dataclass(frozen=True, slots=True)
class Charge:
    #: Unique within the contract: what the charge is for.
    key: str
    kind: ChargeKind
    starts_at: datetime
    ends_at: datetime
    issued_at: datetime
    amount: Decimal
    request_id: int | None
    plan: str
    term: TermLength
    description: str
    #: The share charged: ``part`` of ``whole`` months or seconds (prorations and refunds).
    part: int | None = None
    whole: int | None = None
    unit: Literal["months", "seconds"] | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    request: Request
    #: Applies when the term of this index ends.
    target: int
    #: cancel with a last month: the first instant after it.
    end_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one request did."""

    request: Request
    changed: bool
    effect: Effect | None
    #: When it takes (or took) effect, as far as known when it was applied.
    effective_at: datetime | None
    charges: tuple[Charge, ...] = ()


def term_value(plan: Plan, commitments: Iterable[tuple[str, int]], length: TermLength) -> Decimal:
    """A term's fee: the plan's monthly base fee or annual price, plus the committed devices
    priced by the plan's tiers for each month of the term."""
    if length == "annual":
        if plan.annual_price is None:
            raise InvalidError(
                f"plan {plan.name!r} has no annual price: its contracts run monthly only",
                field="term",
            )
        fee = plan.annual_price
    else:
        fee = plan.base_fee
    devices = Decimal(0)
    for device_class, count in commitments:
        if device_class not in plan.classes:
            raise InvalidError(
                f"device class {device_class!r} is not priced by plan {plan.name!r} "
                f"(priced: {', '.join(sorted(plan.classes))})",
                field="commit",
            )
        devices += class_amount(device_class, plan.classes[device_class], count, plan.currency)
    return round_money(fee + MONTHS[length] * devices, plan.currency)


def _in_utc(request: Request) -> Request:
    # Aware datetimes that share a tzinfo compare by wall time, fold ignored: in UTC every
    # comparison is between instants.
    return replace(request, at=request.at.astimezone(UTC))


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Simulation:
    """One contract replayed: ``apply`` its requests in order, ``advance`` to an instant.

    ``term`` is the term in force (in the calendar free period: the first term, which has not
    begun: ``begun`` is False). ``charges`` holds every charge known so far, including a
    calendar proration issued at a later 1st: the caller keeps those issued by its instant.
    """

    def __init__(
        self, policy: Policy, tz: str, currency: str, value: Pricer, start: Request
    ) -> None:
        if start.kind != "start" or start.term is None or start.content is None:
            raise ValueError("a contract begins with a start request naming a term and content")
        content, length = start.content, start.term
        start = _in_utc(start)
        self.policy: Policy = policy
        self.tz = tz
        self.currency = currency
        self.value = value
        self.started_at = start.at
        self.content: Content = content
        self.length: TermLength = length
        first = first_term_start(policy, start.at, tz)
        self.free_until: datetime | None = first if policy == "calendar" else None
        # Renewals are counted from the anchor (periods' anniversary day rule); it moves when a
        # term of another length begins or a term is cut.
        self.anchor = first
        self.renewals = 0
        self.term = Term(0, self.length, first, self._end(first, 0), self.content, Decimal(0))
        self.begun = False
        self.pending: list[Pending] = []
        self.ended_at: datetime | None = None
        self.terms: list[Term] = []
        self.charges: list[Charge] = []
        #: Request id -> the instant it took effect.
        self.effective: dict[int, datetime] = {start.id: start.at}
        self.last_at = start.at
        self.outcomes: list[Outcome] = [Outcome(start, True, "now", start.at)]
        self.advance(start.at)

    # --- time ---------------------------------------------------------------------------------

    def _end(self, anchor: datetime, renewals: int) -> datetime:
        return add_months(anchor, (renewals + 1) * MONTHS[self.length], self.tz)

    def advance(self, until: datetime) -> None:
        """Begin and renew terms up to ``until`` (a term that begins at ``until`` included)."""
        until = until.astimezone(UTC)
        while self.ended_at is None:
            if not self.begun:
                if self.term.starts_at > until:
                    return
                self._begin()
            elif self.term.ends_at <= until:
                self._boundary(self.term.ends_at)
            else:
                return

    def _begin(self) -> None:
        self.begun = True
        # Billed for the content in force when it begins (a calendar increase in the free
        # period is in the first term's fee).
        term = replace(
            self.term, content=self.content, fee=self.value(self.content, self.term.length)
        )
        self.term = term
        self.terms.append(term)
        self.charges.append(
            Charge(
                key=f"term:{_utc(term.starts_at)}",
                kind="term_fee",
                starts_at=term.starts_at,
                ends_at=term.ends_at,
                issued_at=term.starts_at,
                amount=term.fee,
                request_id=None,
                plan=term.content.plan,
                term=term.length,
                description=f"{term.length} term {self._describe(term.content)} "
                f"{self._days(term.starts_at, term.ends_at)}",
            )
        )

    def _boundary(self, at: datetime, *, cut_to: TermLength | None = None) -> None:
        """The current term ends at ``at``: what waited for its end applies, then the next
        term begins (of ``cut_to``'s length when an anniversary restart cuts the term)."""
        ending = self.term
        length = self.length if cut_to is None else cut_to
        keep: list[Pending] = []
        for item in self.pending:
            request = item.request
            if item.target > ending.index:
                keep.append(item)
            elif request.kind == "change":
                assert request.content is not None
                self.content = request.content
                self.effective[request.id] = at
            elif request.kind == "switch":
                assert request.term is not None
                length = request.term
                self.effective[request.id] = at
            elif item.end_at is None or at >= item.end_at:
                self.ended_at = self.effective[request.id] = at
            else:
                # Service runs on to the last month asked for: renewed until a term end
                # reaches it, an annual calendar term that would overrun it as monthly terms.
                keep.append(replace(item, target=ending.index + 1))
                if (
                    self.policy == "calendar"
                    and length == "annual"
                    and add_months(at, MONTHS["annual"], self.tz) > item.end_at
                ):
                    length = "monthly"
        if cut_to is not None:
            self.terms[-1] = replace(ending, ends_at=at)
        if self.ended_at is not None:
            self.pending = []
            return
        self.pending = keep
        if length != self.length or cut_to is not None:
            self.anchor, self.renewals = at, 0
        else:
            self.renewals += 1
        self.length = length
        self.term = Term(
            ending.index + 1,
            length,
            at,
            self._end(self.anchor, self.renewals),
            self.content,
            Decimal(0),
        )
        self._begin()

    # --- requests -----------------------------------------------------------------------------

    def apply(self, request: Request) -> Outcome:
        """Apply one request at its instant (after every term boundary up to it)."""
        request = _in_utc(request)
        if request.at < self.last_at:
            raise ConflictError(
                f"at {request.at.isoformat()} is before the contract's latest request "
                f"({self.last_at.isoformat()}): requests are recorded in order",
                field="at",
            )
        self.advance(request.at)
        if self.ended_at is not None:
            raise ConflictError(
                f"the contract ended at {self.ended_at.isoformat()}: start a new one",
                field="contract",
            )
        self.last_at = request.at
        before = len(self.charges)
        if request.kind == "change":
            outcome = self._change(request)
        elif request.kind == "switch":
            outcome = self._switch(request)
        elif request.kind == "cancel":
            outcome = self._cancel(request)
        else:
            raise ConflictError("the account's contract is already running", field="contract")
        outcome = replace(outcome, charges=tuple(self.charges[before:]))
        if outcome.changed:
            self.outcomes.append(outcome)
        return outcome

    def _waiting(self, kind: RequestKind) -> Pending | None:
        found = [p for p in self.pending if p.request.kind == kind]
        return found[-1] if found else None

    def _drop(self, kind: RequestKind) -> None:
        self.pending = [p for p in self.pending if p.request.kind != kind]

    def _in_time(self, at: datetime) -> bool:
        """Calendar: requested by the current term's deadline (the end of the 20th of its last
        month). In the free period the current term is the first one."""
        return at < deadline(self.term.starts_at, self.term.ends_at, self.tz)

    def _wait(self, at: datetime) -> Effect:
        if self.policy == "anniversary" or self._in_time(at):
            return "term_end"
        return "following_term_end"

    def _change(self, request: Request) -> Outcome:
        new = request.content
        assert new is not None
        waiting = self._waiting("change")
        target = waiting.request.content if waiting is not None else self.content
        if request.effect is None and new == target:
            return Outcome(request, False, None, None)
        values = request.values or (
            self.value(self.content, self.length),
            self.value(new, self.length),
        )
        old, worth = values
        effect = request.effect
        if effect is None:
            if worth < old:
                effect = self._wait(request.at)
            elif self.policy == "anniversary" and old == 0:
                effect = "restart"
            else:
                effect = "now"
        request = replace(request, effect=effect, values=values)
        self._drop("change")
        if effect in ("term_end", "following_term_end"):
            item = Pending(request, self.term.index + (effect == "following_term_end"))
            self.pending.append(item)
            return Outcome(request, True, effect, self._project(item))
        if effect == "restart":
            self._refuse_while_cancelled("plan")
            self.content = new
            self.effective[request.id] = request.at
            self._boundary(request.at, cut_to=self.length)
            return Outcome(request, True, effect, request.at)
        self.content = new
        self.effective[request.id] = request.at
        self._prorate_increase(request, worth - old)
        return Outcome(request, True, effect, request.at)

    def _prorate_increase(self, request: Request, difference: Decimal) -> None:
        term = self.term
        assert request.content is not None
        unit: Literal["months", "seconds"]
        if self.policy == "calendar":
            if not self.begun:
                return  # the first term's fee, issued at its start, holds it
            start = first_of_month_on_or_after(request.at, self.tz)
            if start >= term.ends_at:
                return  # no whole month left: the next term's fee holds it
            part = months_between(start, term.ends_at, self.tz)
            whole, unit = MONTHS[term.length], "months"
        else:
            start = request.at
            part = seconds_between(start, term.ends_at)
            whole, unit = seconds_between(term.starts_at, term.ends_at), "seconds"
            if part <= 0:
                return
        self.charges.append(
            Charge(
                key=f"proration:{request.id}",
                kind="proration",
                starts_at=start,
                ends_at=term.ends_at,
                issued_at=start,
                amount=prorate(difference, part, whole, self.currency),
                request_id=request.id,
                plan=request.content.plan,
                term=term.length,
                description=f"increase to {self._describe(request.content)}: "
                f"{format_money(difference, self.currency)} x {part}/{whole} {unit} "
                f"{self._days(start, term.ends_at)}",
                part=part,
                whole=whole,
                unit=unit,
            )
        )

    def _switch(self, request: Request) -> Outcome:
        to = request.term
        assert to is not None
        self._refuse_while_cancelled("term")
        waiting = self._waiting("switch")
        target = waiting.request.term if waiting is not None else self.length
        if request.effect is None and to == target:
            return Outcome(request, False, None, None)
        # The new length must be one the plan sells (an annual price), whatever it costs.
        values = request.values or (
            self.value(self.content, self.length),
            self.value(self.latest_content(), to),
        )
        if self.policy == "calendar":
            effect = request.effect or self._wait(request.at)
            request = replace(request, effect=effect, values=values)
            self._drop("switch")
            item = Pending(request, self.term.index + (effect == "following_term_end"))
            self.pending.append(item)
            return Outcome(request, True, effect, self._project(item))
        request = replace(request, effect="restart", values=values)
        term = self.term
        if self.length == "monthly" and to == "annual":
            part = seconds_between(request.at, term.ends_at)
            whole = seconds_between(term.starts_at, term.ends_at)
            if part > 0:
                self.charges.append(
                    Charge(
                        key=f"refund:{request.id}",
                        kind="refund",
                        starts_at=request.at,
                        ends_at=term.ends_at,
                        issued_at=request.at,
                        amount=prorate(-values[0], part, whole, self.currency),
                        request_id=request.id,
                        plan=self.content.plan,
                        term=self.length,
                        description=f"unused monthly time: "
                        f"{format_money(values[0], self.currency)} x {part}/{whole} seconds "
                        f"{self._days(request.at, term.ends_at)}",
                        part=part,
                        whole=whole,
                        unit="seconds",
                    )
                )
        self.effective[request.id] = request.at
        self._boundary(request.at, cut_to=to)
        return Outcome(request, True, "restart", request.at)

    def _cancel(self, request: Request) -> Outcome:
        end_at = None
        if request.end_after is not None:
            month = request.end_after
            end_at = add_months(month_start(month.year, month.month, self.tz), 1, self.tz)
        new = request.effect is None
        effect = request.effect or self._wait(request.at)
        request = replace(request, effect=effect)
        item = Pending(request, self.term.index + (effect == "following_term_end"), end_at)
        if end_at is not None:
            # The last month named must end after the last term the contract runs anyway has
            # begun: service through it ends with the term in force at its end.
            earliest = self._settled_with(replace(item, end_at=None))
            last_term = earliest.terms[-1]
            if end_at <= last_term.starts_at:
                raise InvalidError(
                    f"end-after {month:%Y-%m}: requested at {request.at.isoformat()}, the "
                    f"contract runs at least to {earliest.ended_at} (its term "
                    f"{self._days(last_term.starts_at, last_term.ends_at)}); name "
                    f"{local_date(last_term.starts_at, self.tz):%Y-%m} or later",
                    field="end_after",
                )
        ends_at = self._settled_with(item).ended_at
        waiting = self._waiting("cancel")
        if new and waiting is not None and self._settled_with(waiting).ended_at == ends_at:
            return Outcome(request, False, None, None)
        self._drop("cancel")
        self.pending.append(item)
        return Outcome(request, True, effect, ends_at)

    def _refuse_while_cancelled(self, what: str) -> None:
        waiting = self._waiting("cancel")
        if waiting is not None:
            raise ConflictError(
                f"the contract is cancelled (it ends {self._settled_with(waiting).ended_at}): "
                "a new term cannot begin before it ends",
                field=what,
            )

    def latest_content(self) -> Content:
        """The content a new change starts from: what waits for a term's end, else what is
        in force."""
        waiting = self._waiting("change")
        return (waiting.request.content or self.content) if waiting else self.content

    # --- projection ---------------------------------------------------------------------------

    def fork(self) -> Simulation:
        twin = object.__new__(Simulation)
        twin.__dict__.update(self.__dict__)
        twin.pending = list(self.pending)
        twin.terms = list(self.terms)
        twin.charges = list(self.charges)
        twin.effective = dict(self.effective)
        twin.outcomes = list(self.outcomes)
        return twin

    def settle(self) -> Simulation:
        """A copy run on, without further requests, until nothing waits (or it ends)."""
        twin = self.fork()
        for _ in range(_MAX_TERMS):
            if twin.ended_at is not None or not twin.pending:
                break
            twin.advance(twin.term.starts_at if not twin.begun else twin.term.ends_at)
        return twin

    def _settled_with(self, item: Pending) -> Simulation:
        """Run on with ``item`` waiting in place of any other request of its kind."""
        twin = self.fork()
        twin.pending = [p for p in twin.pending if p.request.kind != item.request.kind] + [item]
        return twin.settle()

    def _project(self, item: Pending) -> datetime | None:
        """When ``item`` would take effect if nothing else were requested."""
        return self._settled_with(item).effective.get(item.request.id)

    def effective_at(self, request_id: int) -> datetime | None:
        """When a request took or will take effect (nothing else being requested)."""
        if request_id in self.effective:
            return self.effective[request_id]
        return self.settle().effective.get(request_id)

    # --- words --------------------------------------------------------------------------------

    def _days(self, start: datetime, end: datetime) -> str:
        return f"{local_date(start, self.tz)}..{last_day(start, end, self.tz)}"

    def _describe(self, content: Content) -> str:
        devices = "".join(f" + {c} x{n}" for c, n in content.commitments)
        return f"{content.plan}{devices}"
