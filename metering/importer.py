"""History import for operators moving from another system: devices.csv and events.csv.

``devices.csv``: ``device_id,account,class,registered_at[,gateway]``; every row registers a device
Active at ``registered_at`` (D1) with a fresh key that is stored hashed and never shown: the
operator re-issues keys (``devices rotate-key``) when the devices move over. ``events.csv``:
``time,device_id,state[,source][,account]``; device ids are unique per account only (D1a), so
the ``account`` column is needed where an id exists in more than one account. Times are ISO
8601 with an offset; a naive time is refused rather than guessed.

Both files are validated completely, against the directory loaded once and against each other,
before anything is written to the real tables: a bad row refuses the import with its file, line
and reason. Events are streamed (csv module, binary COPY into a temp stage, one set-based insert),
so memory grows with the number of devices, not events, and a million events take seconds.
"""

from __future__ import annotations

import csv
import io
import itertools
import time as _clock
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, LiteralString, get_args

import psycopg
from psycopg.rows import tuple_row

from devmeter.errors import ConflictError, InvalidError
from metering.catalog import Catalog
from metering.registry import (
    DEVICE_ID,
    GATEWAY_CLASS,
    EventSource,
    payment_method_required_message,
)
from metering.secrets import DEVICE_KEY_PREFIX, new_secret

__all__ = ["ImportResult", "ImportRowError", "Progress", "import_history"]

Conn = psycopg.Connection[Any]
#: ``(file label, bytes read, file size)``; the CLI draws a progress bar from it.
Progress = Callable[[str, int, int], None]

DEVICE_COLUMNS: Final = ("device_id", "account", "class", "registered_at")
DEVICE_OPTIONAL: Final = ("gateway",)
EVENT_COLUMNS: Final = ("time", "device_id", "state")
EVENT_OPTIONAL: Final = ("source", "account")
STATES: Final = frozenset({"active", "inactive"})
# The sources a person or system can have caused; 'timeout' is derived by devmeter (D5), so an
# imported one would be a second, unexplained copy of a rule the plan already applies.
SOURCES: Final = frozenset(get_args(EventSource))
DEFAULT_SOURCE: Final = "import"

PROGRESS_EVERY: Final = 50_000
# As in ingest: clocks drift a little, but an event from the future would become a device's
# current state ahead of time; and a time before 2000 is a typo that would also create a
# partition for every month since.
_MAX_FUTURE: Final = timedelta(minutes=5)
_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)

_DEVICE_TYPES: Final = [
    "text", "int8", "text", "text", "text", "bytea", "timestamptz", "text", "timestamptz",
]  # fmt: skip
_EVENT_TYPES: Final = ["timestamptz", "text", "int8", "text", "text", "text"]
_STAGE_TYPES: Final = ["int8", *_EVENT_TYPES]

_SELECT_ACCOUNTS: Final[LiteralString] = (
    "SELECT id, ref, plan, status,"
    " EXISTS (SELECT 1 FROM payment_methods p WHERE p.account_id = a.id) AS paying"
    " FROM accounts a"
)
_SELECT_DIRECTORY: Final[LiteralString] = (
    "SELECT account_id, id, device_class, registered_at FROM devices"
)
_SELECT_STORAGE_MODE: Final[LiteralString] = (
    "SELECT value FROM devmeter_meta WHERE key = 'storage_mode'"
)
_ENSURE_PARTITIONS: Final[LiteralString] = (
    "SELECT devmeter_ensure_month_partitions('device_state_events'::regclass, %s, %s)"
)
_CREATE_STAGE: Final[LiteralString] = """
    CREATE TEMP TABLE import_event_stage (
        ord           bigint NOT NULL,
        time          timestamptz NOT NULL,
        device_id     text NOT NULL,
        account_id    bigint NOT NULL,
        device_class  text NOT NULL,
        state         text NOT NULL,
        source        text NOT NULL
    ) ON COMMIT DROP
"""
_DROP_STAGE: Final[LiteralString] = "DROP TABLE IF EXISTS pg_temp.import_event_stage"
_COPY_STAGE: Final[LiteralString] = (
    "COPY import_event_stage (ord, time, device_id, account_id, device_class, state, source) "
    "FROM STDIN (FORMAT BINARY)"
)
_COPY_DEVICES: Final[LiteralString] = (
    "COPY devices (id, account_id, device_class, gateway_id, key_prefix, key_hash, "
    "registered_at, state, state_at) FROM STDIN (FORMAT BINARY)"
)
_COPY_EVENTS: Final[LiteralString] = (
    "COPY device_state_events (time, device_id, account_id, device_class, state, source) "
    "FROM STDIN (FORMAT BINARY)"
)
# Within an instant, file order becomes id order, so of two events of one device at the same
# instant the later line wins, as the later-recorded event does everywhere else (D3). Inserting
# in time order, whatever the file's order (exports often go device by device), keeps the index
# writes local: a device-ordered insert measured about twice as slow. The sort is the import's
# one big allocation: given room, it runs in memory instead of spilling to disk.
_SORT_MEMORY: Final = "256MB"
_SHOW_WORK_MEM: Final[LiteralString] = "SELECT current_setting('work_mem')"
_SET_WORK_MEM: Final[LiteralString] = "SELECT set_config('work_mem', %s, true)"
_INSERT_STAGED_EVENTS: Final[LiteralString] = """
    INSERT INTO device_state_events (time, device_id, account_id, device_class, state, source)
    SELECT time, device_id, account_id, device_class, state, source
    FROM import_event_stage
    ORDER BY time, ord
"""
# Each device's latest imported event by (time, line) against its current state, which every
# writer keeps at its latest event by (time, id) (D3): the imported event, having the larger id,
# wins a tie with an older event at the same instant, and an older imported event changes
# nothing. Comparing with `state_at` costs nothing, where recomputing from the events would
# read every event of every touched device. It also keeps a newer state committed by a
# concurrent writer.
_USAGE_BULK: Final[LiteralString] = "SELECT set_config('devmeter.usage_bulk', %s, true)"
_REBUILD_USAGE: Final[LiteralString] = (
    "SELECT devmeter_usage_rebuild(a) FROM unnest(%s::bigint[]) AS a ORDER BY a"
)
_UPDATE_STATES: Final[LiteralString] = """
    UPDATE devices d
    SET state = l.state, state_at = l.time
    FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::text[])
         AS l (account_id, device_id, time, state)
    WHERE d.account_id = l.account_id AND d.id = l.device_id
      AND d.state_at <= l.time
      AND (d.state <> l.state OR d.state_at <> l.time)
"""


class ImportRowError(InvalidError):
    """A row (or the header) that refuses the whole import; ``line`` is 1-based, header is 1."""

    def __init__(self, file: str, line: int, reason: str, *, field: str) -> None:
        super().__init__(f"{file} line {line}: {reason}", field=field)
        self.file = file
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class ImportResult:
    devices: int
    #: Rows of events.csv; the registration events of devices.csv are counted apart.
    events: int
    registration_events: int
    #: Distinct accounts whose devices or events were imported.
    accounts: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Account:
    id: int
    ref: str
    plan: str
    suspended: bool
    #: A payment method is on file (A2).
    paying: bool


@dataclass(frozen=True, slots=True)
class _NewDevice:
    id: str
    account_id: int
    device_class: str
    registered_at: datetime
    gateway_id: str | None


# What a row of events.csv needs to know about its device: (account id, class, registered_at).
# A tuple, not a dataclass: it is read once per event, a million times.
_Known = tuple[int, str, datetime]
# A device is its account and its id (D1a).
_Key = tuple[int, str]


class _Directory:
    """Every known device by (account id, device id), and the accounts of each id."""

    __slots__ = ("by_id", "known")

    def __init__(self) -> None:
        self.known: dict[_Key, _Known] = {}
        self.by_id: dict[str, list[int]] = {}

    def add(self, account_id: int, device_id: str, known: _Known) -> None:
        self.known[(account_id, device_id)] = known
        self.by_id.setdefault(device_id, []).append(account_id)


def import_history(
    conn: Conn,
    catalog: Catalog,
    *,
    devices: Path | None = None,
    events: Path | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import ``devices`` then ``events``; either file may be left out.

    Events may refer to devices of the same import. Both files are validated in full before any
    row reaches the real tables, so a bad row in either file, the events file included, leaves
    devices and events as they were; the transaction is left usable (the work runs in a
    savepoint). The caller owns the transaction: nothing is committed here, and the caller's
    rollback also undoes an import that failed while writing (e.g. a device registered by
    someone else meanwhile). On an autocommit connection the import runs in its own
    transaction, so it is all-or-nothing there too.

    Registration rows become 'active' events with source 'import' at ``registered_at``. Every
    touched device's current state is then set from its latest event by (time, id), the
    device's older events included.
    """
    if devices is None and events is None:
        raise InvalidError("nothing to import: give a devices file, an events file or both")
    started = _clock.perf_counter()
    latest_allowed = datetime.now(UTC) + _MAX_FUTURE
    report: Progress = progress or _no_progress

    # The first query also opens the caller's implicit transaction, so that the block below is
    # a savepoint inside it rather than a transaction of its own that would commit.
    with conn.cursor(row_factory=tuple_row) as cur:
        accounts = {
            str(ref): _Account(int(id_), str(ref), str(plan), status == "suspended", bool(paying))
            for id_, ref, plan, status, paying in cur.execute(_SELECT_ACCOUNTS)
        }
        # In UTC like the parsed times: comparing datetimes of two different tzinfo objects is
        # an order of magnitude slower, and there is one comparison per event.
        directory = _Directory()
        for account_id, id_, cls, registered_at in cur.execute(_SELECT_DIRECTORY):
            directory.add(
                int(account_id),
                str(id_),
                (int(account_id), str(cls), registered_at.astimezone(UTC)),
            )

    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        # Usage figures (migration 0014) are rebuilt once per touched account below, set-based,
        # rather than by the per-event trigger: a million events in history order would each
        # find a later bucket to move.
        cur.execute(_USAGE_BULK, ("on",))
        new_devices: list[_NewDevice] = []
        if devices is not None:
            from metering.contracts import spans

            required = [
                a.id
                for a in accounts.values()
                if (plan := catalog.plans.get(a.plan)) is not None and plan.contract_required
            ]
            contracts = {i: spans(conn, catalog, i, latest_allowed) for i in required}
            new_devices = _read_devices(
                devices, accounts, catalog, directory, latest_allowed, report, contracts
            )
        span = _Span()
        for device in new_devices:
            span.add(device.registered_at)
        event_count = 0
        latest: dict[_Key, tuple[datetime, str]] = {}
        if events is not None:
            cur.execute(_DROP_STAGE)
            cur.execute(_CREATE_STAGE)
            event_count = _stage_events(
                cur, events, directory, accounts, latest_allowed, span, latest, report
            )

        if span.first is not None and span.last is not None and _is_plain(cur):
            # Before the rows arrive, so they land in their month rather than in the default
            # partition, from which the function would have to move them again.
            cur.execute(_ENSURE_PARTITIONS, (span.first, span.last + timedelta(microseconds=1)))
        if new_devices:
            _write_devices(cur, new_devices)
        if events is not None:
            _insert_staged_events(cur)
        if latest:
            keys = list(latest)
            times = [latest[k][0] for k in keys]
            states = [latest[k][1] for k in keys]
            cur.execute(_UPDATE_STATES, ([k[0] for k in keys], [k[1] for k in keys], times, states))
        touched_accounts = {k[0] for k in latest}
        touched_accounts.update(d.account_id for d in new_devices)
        cur.execute(_REBUILD_USAGE, (sorted(touched_accounts),))
        cur.execute(_USAGE_BULK, ("off",))

    return ImportResult(
        devices=len(new_devices),
        events=event_count,
        registration_events=len(new_devices),
        accounts=len(touched_accounts),
        seconds=round(_clock.perf_counter() - started, 3),
    )


def _no_progress(_label: str, _done: int, _total: int) -> None:
    return None


class _Span:
    """The earliest and latest time written, for the month partitions."""

    __slots__ = ("first", "last")

    def __init__(self) -> None:
        self.first: datetime | None = None
        self.last: datetime | None = None

    def add(self, at: datetime) -> None:
        if self.first is None or at < self.first:
            self.first = at
        if self.last is None or at > self.last:
            self.last = at


# --- reading ---------------------------------------------------------------------------------


class _Csv:
    """A CSV file read row by row with its line numbers, byte progress and header check."""

    def __init__(self, path: Path, field: str, report: Progress) -> None:
        self.path = path
        self.name = path.name
        self.field = field
        self.report = report
        self.line = 1
        self.columns: dict[str, int] = {}

    def error(self, reason: str, line: int | None = None) -> ImportRowError:
        return ImportRowError(
            self.name, self.line if line is None else line, reason, field=self.field
        )

    @contextmanager
    def rows(
        self, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> Iterator[Iterator[list[str]]]:
        """Check the header, then yield the data rows, each with exactly the header's width.

        The header is the required columns, then any of the optional ones in their order;
        ``self.columns`` maps each column present to its position.
        """
        try:
            raw = self.path.open("rb")
        except OSError as exc:
            raise InvalidError(
                f"cannot read {self.path}: {exc.strerror or exc}", field=self.field
            ) from None
        # utf-8-sig: spreadsheet programs start their CSV exports with a byte-order mark.
        with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
            yield self._rows(raw, text, required, optional)

    def _rows(
        self,
        raw: io.BufferedReader,
        text: io.TextIOWrapper,
        required: tuple[str, ...],
        optional: tuple[str, ...],
    ) -> Iterator[list[str]]:
        total = self.path.stat().st_size
        # The text layer reads ahead in chunks, so the byte position is a few KiB early: plenty
        # for a progress bar, and it costs nothing per row.
        reader = csv.reader(text, strict=True)
        shown = ",".join(required) + "".join(f"[,{name}]" for name in optional)
        try:
            header = next(reader, None)
            if header is None:
                raise self.error(f"empty file: expected the header {shown}")
            extra = header[len(required) :]
            if (
                header[: len(required)] != list(required)
                or len(set(extra)) != len(extra)
                or extra != [name for name in optional if name in extra]
            ):
                raise self.error(f"header must be {shown}, got {','.join(header)!r}")
            self.columns = {name: i for i, name in enumerate(header)}
            width = len(header)
            names = ",".join(header)
            blank_at: int | None = None
            count = done = 0
            for row in reader:
                self.line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    blank_at = blank_at or self.line
                    continue
                if blank_at is not None:
                    raise self.error(
                        "blank line inside the file (only allowed at its end)", blank_at
                    )
                if len(row) != width:
                    raise self.error(f"expected {width} fields ({names}), got {len(row)}")
                yield row
                count += 1
                if count % PROGRESS_EVERY == 0:
                    done = raw.tell()
                    self.report(self.name, done, total)
        except csv.Error as exc:
            raise self.error(f"malformed CSV: {exc}", reader.line_num) from None
        except UnicodeDecodeError as exc:
            raise self.error(f"not UTF-8 text: {exc.reason}", reader.line_num + 1) from None
        if done != total:
            self.report(self.name, total, total)


def _parse_time(text: str, column: str, latest_allowed: datetime) -> datetime | str:
    """A UTC datetime, or the reason the text is not an acceptable one."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return f"{column} {text!r} is not an ISO 8601 time"
    if at.tzinfo is None or at.utcoffset() is None:
        return f"{column} {text!r} has no UTC offset (write e.g. 2026-10-01T09:00:00+09:00 or Z)"
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        return f"{column} {text!r} is out of range"
    if at > latest_allowed:
        return f"{column} {text!r} is in the future"
    if at < _EARLIEST:
        return f"{column} {text!r} is before {_EARLIEST.date()}"
    return at


def _read_devices(
    path: Path,
    accounts: dict[str, _Account],
    catalog: Catalog,
    directory: _Directory,
    latest_allowed: datetime,
    report: Progress,
    contracts: dict[int, list[tuple[datetime, datetime | None]]],
) -> list[_NewDevice]:
    """Validate every row; on success the new devices are also added to ``directory``.

    A gateway must already exist or be listed on an earlier line: one pass then knows every
    gateway when it meets a device bound to one, and the first bad line is the one reported.
    """
    source = _Csv(path, "devices", report)
    new: list[_NewDevice] = []
    lines: dict[_Key, int] = {}
    added: dict[_Key, _Known] = {}
    with source.rows(DEVICE_COLUMNS, DEVICE_OPTIONAL) as rows:
        for row in rows:
            device_id, ref, device_class, registered_text = row[0], row[1], row[2], row[3]
            gateway_id = row[4] if len(row) > 4 and row[4] else None
            if not DEVICE_ID.match(device_id):
                raise source.error(
                    f"invalid device id {device_id!r}: letters, digits, '.', '-' and '_', "
                    "starting with a letter or digit, at most 64 characters"
                )
            account = accounts.get(ref)
            if account is None:
                raise source.error(f"unknown account {ref!r}")
            key = (account.id, device_id)
            if key in lines:
                raise source.error(
                    f"device {device_id!r} is listed twice (first on line {lines[key]})"
                )
            if key in directory.known:
                raise source.error(f"device {device_id!r} already exists")
            if account.suspended:
                # A3, as for a registration through the console or the API.
                raise source.error(f"account {ref!r} is suspended: devices cannot be registered")
            plan = catalog.plans.get(account.plan)
            if plan is None:
                raise source.error(
                    f"plan {account.plan!r} of account {ref!r} is not in the catalog"
                )
            if plan.payment_method_required and not account.paying:
                # A2, as for a registration through the console or the API.
                raise source.error(f"account {ref!r}: {payment_method_required_message(plan.name)}")
            # Issue 12, as for a registration: a contract must run at the registration.
            contract_spans = contracts.get(account.id, []) if plan.contract_required else None
            classes = plan.classes
            if device_class not in classes:
                known = ", ".join(sorted(classes))
                raise source.error(
                    f"plan {account.plan!r} of account {ref!r} has no device class "
                    f"{device_class!r} (it has: {known})"
                )
            registered_at = _parse_time(registered_text, "registered_at", latest_allowed)
            if isinstance(registered_at, str):
                raise source.error(registered_at)
            if contract_spans is not None and not any(
                start <= registered_at and (end is None or registered_at < end)
                for start, end in contract_spans
            ):
                raise source.error(
                    f"account {ref!r}: plan {account.plan!r} requires a contract, and none runs "
                    f"at {registered_at.isoformat()} (devmeter contracts start)"
                )
            if gateway_id is not None:
                gateway = added.get((account.id, gateway_id)) or directory.known.get(
                    (account.id, gateway_id)
                )
                # Another account's device is "unknown", never "not yours" (A4).
                if gateway is None:
                    raise source.error(
                        f"unknown gateway {gateway_id!r}: it must exist already or be listed "
                        "on an earlier line of this file"
                    )
                if gateway[1] != GATEWAY_CLASS:
                    raise source.error(
                        f"gateway {gateway_id!r} is of class {gateway[1]!r}, not {GATEWAY_CLASS!r}"
                    )
            lines[key] = source.line
            added[key] = (account.id, device_class, registered_at)
            new.append(_NewDevice(device_id, account.id, device_class, registered_at, gateway_id))
    for (account_id, new_id), entry in added.items():
        directory.add(account_id, new_id, entry)
    return new


def _stage_events(
    cur: psycopg.Cursor[Any],
    path: Path,
    directory: _Directory,
    accounts: dict[str, _Account],
    latest_allowed: datetime,
    span: _Span,
    latest: dict[_Key, tuple[datetime, str]],
    report: Progress,
) -> int:
    """Validate every row while copying it into the temp stage; returns the number of rows.

    ``latest`` receives each device's last event by (time, line).

    The stage is not the billing table: a bad row raises and the caller's savepoint drops it.
    """
    source = _Csv(path, "events", report)
    fromisoformat = datetime.fromisoformat
    utc = UTC
    count = 0
    first: datetime | None = None
    last: datetime | None = None
    with source.rows(EVENT_COLUMNS, EVENT_OPTIONAL) as rows, cur.copy(_COPY_STAGE) as copy:
        copy.set_types(_STAGE_TYPES)
        write_row = copy.write_row
        # The header is read with the first row: only then are the optional columns known.
        first_row = next(rows, None)
        source_at = source.columns.get("source")
        account_at = source.columns.get("account")
        known_of = directory.known.get
        for row in itertools.chain([first_row] if first_row is not None else [], rows):
            time_text, device_id, state = row[0], row[1], row[2]
            event_source = (
                row[source_at] if source_at is not None and row[source_at] else DEFAULT_SOURCE
            )
            # The common case inline; _parse_time explains what is wrong with the others.
            try:
                at = fromisoformat(time_text)
                if at.tzinfo is None:
                    raise ValueError
                at = at.astimezone(utc)
                if at > latest_allowed or at < _EARLIEST:
                    raise ValueError
            except (ValueError, OverflowError):
                reason = _parse_time(time_text, "time", latest_allowed)
                assert isinstance(reason, str)
                raise source.error(reason) from None
            if account_at is not None and row[account_at]:
                account = accounts.get(row[account_at])
                if account is None:
                    raise source.error(f"unknown account {row[account_at]!r}")
                account_id = account.id
            else:
                owners = directory.by_id.get(device_id)
                if not owners:
                    raise source.error(f"unknown device {device_id!r}")
                if len(owners) > 1:
                    raise source.error(
                        f"device id {device_id!r} exists in more than one account: "
                        "add an account column"
                    )
                account_id = owners[0]
            known = known_of((account_id, device_id))
            if known is None:
                raise source.error(f"unknown device {device_id!r}")
            if state not in STATES:
                raise source.error(f"invalid state {state!r}: active or inactive")
            if event_source not in SOURCES:
                allowed = ", ".join(sorted(SOURCES))
                raise source.error(f"invalid source {event_source!r}: one of {allowed}")
            if at < known[2]:
                raise source.error(
                    f"event at {_show(at)} is before device {device_id!r} was registered "
                    f"({_show(known[2])}): billing counts a device from its registration (D1)"
                )
            write_row((source.line, at, device_id, known[0], known[1], state, event_source))
            key = (account_id, device_id)
            previous = latest.get(key)
            if previous is None or at >= previous[0]:
                latest[key] = (at, state)
            if first is None or at < first:
                first = at
            if last is None or at > last:
                last = at
            count += 1
    if first is not None and last is not None:
        span.add(first)
        span.add(last)
    return count


def _show(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- writing ---------------------------------------------------------------------------------


def _is_plain(cur: psycopg.Cursor[Any]) -> bool:
    row = cur.execute(_SELECT_STORAGE_MODE).fetchone()
    return row is not None and row[0] == "plain"


def _insert_staged_events(cur: psycopg.Cursor[Any]) -> None:
    row = cur.execute(_SHOW_WORK_MEM).fetchone()
    assert row is not None
    cur.execute(_SET_WORK_MEM, (_SORT_MEMORY,))
    cur.execute(_INSERT_STAGED_EVENTS)
    # set_config(..., true) lasts until the caller's transaction ends: give the setting back.
    cur.execute(_SET_WORK_MEM, (row[0],))
    cur.execute(_DROP_STAGE)


def _write_devices(cur: psycopg.Cursor[Any], devices: list[_NewDevice]) -> None:
    try:
        with cur.copy(_COPY_DEVICES) as copy:
            copy.set_types(_DEVICE_TYPES)
            for d in devices:
                key = new_secret(DEVICE_KEY_PREFIX)
                copy.write_row(
                    (
                        d.id, d.account_id, d.device_class, d.gateway_id, key.prefix, key.digest,
                        d.registered_at, "active", d.registered_at,
                    )
                )  # fmt: skip
    except psycopg.errors.UniqueViolation as exc:
        # Checked against the directory, so someone registered the same id since it was read.
        detail = exc.diag.message_detail or str(exc)
        raise ConflictError(
            f"a device was registered by someone else during the import ({detail}); "
            "run the import again",
            field="devices",
        ) from exc
    with cur.copy(_COPY_EVENTS) as copy:
        copy.set_types(_EVENT_TYPES)
        for d in devices:
            copy.write_row(
                (d.registered_at, d.id, d.account_id, d.device_class, "active", DEFAULT_SOURCE)
            )
