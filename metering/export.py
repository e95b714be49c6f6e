"""The monthly export to the billing system (SPEC C3): closed statements as CSV, JSON Lines or
CloudEvents.

Byte-stable by construction: only final statements go in (they never change), rows are
ordered by account ref and line number, money is written as exact decimal strings and times
in UTC with a ``Z``. So the same closed month always exports the same bytes, the checksum is
reproducible, and the export id, derived from the content, names exactly this content.

Two layouts, because billing already holds the bytes of months closed before migration 0012:
a month whose statements all have ``format_version`` 1 is written in the layout it had then
(``COLUMNS_V1``), byte for byte; any other month in ``COLUMNS_V2``, which keeps the v1 columns
in their places and appends the tax rate and the adjustment columns, so a reader of v1 by
position still reads v2. A v1 statement in a v2 month shows its stored values (it has no
adjustment lines; its tax rate was stored with it).

A month in which an exported account was issued contract charges (issue 12) is written in
``COLUMNS_V3``: the v2 columns, then the charge's id, contract, period and issue instant. Each
account's charges of the month (issued in it, account time zone) follow its statement's
lines, one row each, their totals their own. A month without charges keeps its v2 bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import class_row, dict_row

from devmeter.errors import InvalidError, NotFoundError
from metering.pricing import format_money
from metering.registry import Account
from metering.statements import DEFAULT_GRACE, closable_at, month_name, month_start

Format = Literal["csv", "jsonl", "cloudevents"]
FORMATS: Final = ("csv", "jsonl", "cloudevents")

#: Column order of both formats for months closed before migration 0012, kept byte for byte. A
#: statement without lines (no devices, no base fee) still appears, as one row with line_no 0
#: and kind "none", so billing sees every closed account.
COLUMNS_V1: Final = (
    "export_id",
    "account",
    "month",
    "currency",
    "line_no",
    "kind",
    "device_class",
    "description",
    "quantity",
    "unit_price",
    "amount",
    "subtotal",
    "tax",
    "credits_applied",
    "amount_due",
    "due_date",
    "closed_at",
)
#: Every other month: the v1 columns, then the statement's tax rate and, on adjustment lines
#: (C2), the month corrected, the quantities billed and corrected and the rate that month was
#: taxed at (``line_tax_rate``: one CSV header cannot hold two ``tax_rate`` columns).
COLUMNS_V2: Final = (
    *COLUMNS_V1,
    "tax_rate",
    "corrects_month",
    "billed_quantity",
    "corrected_quantity",
    "line_tax_rate",
)
#: A month with contract charges (issue 12): the v2 columns, then the charge's own. On a charge
#: row ``kind`` is the charge's (term_fee, proration, refund), ``line_no`` is empty, the totals
#: are the charge's, ``closed_at`` is when it was issued and ``due_date`` its own.
COLUMNS_V3: Final = (
    *COLUMNS_V2,
    "charge_id",
    "contract",
    "period_start",
    "period_end",
    "issued_at",
)
CHARGE_EVENT_TYPE: Final = "devmeter.charge"
#: CloudEvents attributes of ``--format cloudevents`` (structured mode, JSON format, one event
#: per line), what OpenMeter ingests.
CLOUDEVENTS_SOURCE: Final = "devmeter"
CLOUDEVENTS_TYPE: Final = "devmeter.statement.line"


@dataclass(frozen=True, slots=True)
class Export:
    export_id: str
    month: str
    format: Format
    body: bytes
    sha256: str
    rows: int
    statements: int
    #: 1: the month is exported as it was before migration 0012; 2: with every line kind's
    #: columns and the tax rate; 3: with contract charges.
    layout: int = 2

    @property
    def media_type(self) -> str:
        return "text/csv; charset=utf-8" if self.format == "csv" else "application/x-ndjson"

    @property
    def filename(self) -> str:
        if self.format == "cloudevents":
            return f"devmeter-{self.month}.cloudevents.jsonl"
        return f"devmeter-{self.month}.{self.format}"


def charge_key(account_ref: str, charge_id: int) -> str:
    """One name per charge: its webhook's idempotency key and its CloudEvent's id."""
    return f"dmcharge-{account_ref}-{charge_id}"


def statement_key(account_ref: str, month: str) -> str:
    """One name per statement, whatever the export: the webhook's idempotency key, and with a
    line number the id of that line's CloudEvent."""
    return f"dmstmt-{account_ref}-{month}"


_ROWS_SQL: Final = """
SELECT a.ref AS account, s.id AS statement_id, s.format_version, s.currency, s.subtotal,
       s.tax_rate, s.tax, s.credits_applied, s.amount_due, s.due_date, s.closed_at,
       l.line_no, l.kind, l.device_class, l.description, l.quantity, l.unit_price, l.amount,
       l.corrects_month, l.billed_quantity, l.corrected_quantity, l.tax_rate AS line_tax_rate
FROM statements s
JOIN accounts a ON a.id = s.account_id
LEFT JOIN statement_lines l ON l.statement_id = s.id
WHERE s.month = %(month)s AND (%(statement_id)s::bigint IS NULL OR s.id = %(statement_id)s)
ORDER BY a.ref, l.line_no
"""

# Charges issued in the month, in each account's zone: for the accounts the export holds, or
# one charge (its webhook).
_CHARGES_SQL: Final = """
SELECT a.ref AS account, c.*, k.timezone
FROM charges c
JOIN accounts a ON a.id = c.account_id
JOIN contracts k ON k.id = c.contract_id
WHERE (%(charge_id)s::bigint IS NOT NULL AND c.id = %(charge_id)s)
   OR (%(charge_id)s::bigint IS NULL AND a.ref = ANY(%(accounts)s::text[])
       AND (c.issued_at AT TIME ZONE k.timezone) >= %(month)s::timestamp
       AND (c.issued_at AT TIME ZONE k.timezone) < (%(month)s::timestamp + interval '1 month'))
ORDER BY c.issued_at, c.id
"""


def export_month(
    conn: psycopg.Connection[Any],
    month: str,
    fmt: str,
    *,
    statement_id: int | None = None,
    now: datetime | None = None,
    grace: timedelta = DEFAULT_GRACE,
) -> Export:
    """All final statements of ``month`` (or one, for its webhook) in ``fmt``.

    ``now`` and ``grace`` only word the refusal of a month with nothing closed: when
    ``devmeter close`` can close it.
    """
    if fmt not in FORMATS:
        raise InvalidError(
            f"unknown format {fmt!r}: expected csv, jsonl or cloudevents", field="format"
        )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            _ROWS_SQL, {"month": month_start(month), "statement_id": statement_id}
        ).fetchall()
    if not rows:
        raise _not_closed(conn, month, now or datetime.now(UTC), grace)
    charges: list[dict[str, Any]] = []
    if statement_id is None:
        with conn.cursor(row_factory=dict_row) as cur:
            charges = cur.execute(
                _CHARGES_SQL,
                {
                    "charge_id": None,
                    "accounts": sorted({row["account"] for row in rows}),
                    "month": month_start(month),
                },
            ).fetchall()
    layout = 3 if charges else 1 if all(row["format_version"] == 1 for row in rows) else 2
    columns = (COLUMNS_V1, COLUMNS_V2, COLUMNS_V3)[layout - 1]
    records = _with_charges(
        [_record(month, row, layout) for row in rows], [_charge_record(c) for c in charges]
    )
    return _export(
        f"dmx-{month}-",
        month,
        fmt,
        records,
        columns,
        # Events carry every column whatever the layout: nobody held their bytes before.
        _with_charges(
            [_record(month, row, 2) for row in rows], [_charge_record(c) for c in charges]
        ),
        statements=len({row["statement_id"] for row in rows}),
        layout=layout,
    )


def export_charge(conn: psycopg.Connection[Any], charge_id: int, fmt: str = "jsonl") -> Export:
    """One charge in the v3 layout: what its webhook delivery carries."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            _CHARGES_SQL, {"charge_id": charge_id, "accounts": [], "month": None}
        ).fetchall()
    if not rows:
        raise NotFoundError(f"no charge {charge_id}", field="charge_id")
    record = _charge_record(rows[0])
    return _export(
        f"dmc-{charge_id}-",
        str(record["month"]),
        fmt,
        [record],
        COLUMNS_V3,
        [record],
        statements=0,
        layout=3,
    )


def _export(
    prefix: str,
    month: str,
    fmt: str,
    records: list[dict[str, Any]],
    columns: Sequence[str],
    events: list[dict[str, Any]],
    *,
    statements: int,
    layout: int,
) -> Export:
    # The id names the content, independent of the format it is written in.
    digest = hashlib.sha256(_jsonl(records, columns)).hexdigest()
    export_id = f"{prefix}{digest[:16]}"
    if fmt == "cloudevents":
        body = _cloudevents(events)
    else:
        records = [{"export_id": export_id, **r} for r in records]
        body = _csv(records, columns) if fmt == "csv" else _jsonl(records, columns)
    return Export(
        export_id=export_id,
        month=month,
        format=fmt,  # type: ignore[arg-type]  # checked against FORMATS by the callers
        body=body,
        sha256=hashlib.sha256(body).hexdigest(),
        rows=len(records),
        statements=statements,
        layout=layout,
    )


def _with_charges(
    records: list[dict[str, Any]], charges: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each account's charges right after its statement's rows (kept in the query's order)."""
    if not charges:
        return records
    by_account: dict[str, list[dict[str, Any]]] = {}
    for charge in charges:
        by_account.setdefault(str(charge["account"]), []).append(charge)
    merged: list[dict[str, Any]] = []
    for n, record in enumerate(records):
        merged.append(record)
        last = n + 1 == len(records) or records[n + 1]["account"] != record["account"]
        if last:
            merged.extend(by_account.pop(str(record["account"]), []))
    return merged


def _charge_record(row: dict[str, Any]) -> dict[str, Any]:
    from metering.periods import last_day, local_date

    currency, tz = row["currency"], row["timezone"]
    issued = local_date(row["issued_at"], tz)
    total = row["amount"] + row["tax"]
    return {
        "account": row["account"],
        "month": f"{issued:%Y-%m}",
        "currency": currency,
        "line_no": None,
        "kind": row["kind"],
        "device_class": None,
        "description": row["description"],
        "quantity": 1,
        "unit_price": format_money(row["amount"], currency),
        "amount": format_money(row["amount"], currency),
        "subtotal": format_money(row["amount"], currency),
        "tax": format_money(row["tax"], currency),
        "credits_applied": format_money(row["credits_applied"], currency),
        "amount_due": format_money(total - row["credits_applied"], currency),
        "due_date": row["due_date"].isoformat(),
        "closed_at": _utc(row["issued_at"]),
        "tax_rate": str(row["tax_rate"]),
        "corrects_month": None,
        "billed_quantity": None,
        "corrected_quantity": None,
        "line_tax_rate": None,
        "charge_id": row["id"],
        "contract": row["contract_id"],
        "period_start": local_date(row["period_start"], tz).isoformat(),
        "period_end": last_day(row["period_start"], row["period_end"], tz).isoformat(),
        "issued_at": _utc(row["issued_at"]),
    }


def _not_closed(
    conn: psycopg.Connection[Any], month: str, now: datetime, grace: timedelta
) -> NotFoundError:
    """Why nothing is exported: the month is still open, and from when ``devmeter close`` can
    close it; or it could be closed and nobody has yet. One line, for the CLI's stderr."""
    first = month_start(month)
    with conn.cursor(row_factory=class_row(Account)) as cur:
        accounts = cur.execute(
            "SELECT * FROM accounts WHERE signed_up_on < %s ORDER BY ref",
            (_next_month(first),),
        ).fetchall()
    command = f"devmeter close --month {month}"
    if not accounts:
        return NotFoundError(
            f"no closed statements for {month}: no account had signed up by then, so there is "
            "nothing to close",
            field="month",
        )
    # The month ends zone by zone: the first zone's end bounds when the first account can be
    # closed, the last zone's when all can.
    ends = sorted({(closable_at(a, month, grace), a.timezone) for a in accounts})
    (earliest, first_zone), (latest, last_zone) = ends[0], ends[-1]
    if now >= latest:
        return NotFoundError(
            f"no closed statements for {month}: close the month first ({command}; closable "
            f"since {_local(latest, last_zone)})",
            field="month",
        )
    all_from = (
        f"{_local(latest, last_zone)} (its end in {last_zone} plus {_minutes(grace)} min "
        "grace for late heartbeats)"
    )
    if now < earliest and earliest == latest:
        when = f"from {all_from}"
    elif now < earliest:
        when = (
            f"from {_local(earliest, first_zone)} in {first_zone}, for all accounts from {all_from}"
        )
    else:
        when = f"for some accounts now, for all from {all_from}"
    where = "" if now < earliest else f" in {last_zone}"
    return NotFoundError(
        f"no closed statements for {month}: the month is not closable yet{where}; close the month "
        f"first: {command} can close it {when}",
        field="month",
    )


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def _minutes(grace: timedelta) -> int:
    return int(grace.total_seconds() // 60)


def _local(at: datetime, tz: str) -> str:
    return at.astimezone(ZoneInfo(tz)).isoformat()


def _record(month: str, row: dict[str, Any], layout: int) -> dict[str, str | int | None]:
    currency = row["currency"]
    has_line = row["line_no"] is not None
    record: dict[str, str | int | None] = {
        "account": row["account"],
        "month": month,
        "currency": currency,
        "line_no": row["line_no"] if has_line else 0,
        "kind": row["kind"] if has_line else "none",
        "device_class": row["device_class"],
        "description": row["description"] if has_line else "no charges",
        "quantity": row["quantity"] if has_line else 0,
        "unit_price": format_money(row["unit_price"], currency) if has_line else None,
        "amount": format_money(row["amount"], currency)
        if has_line
        else format_money(Decimal(0), currency),
        "subtotal": format_money(row["subtotal"], currency),
        "tax": format_money(row["tax"], currency),
        "credits_applied": format_money(row["credits_applied"], currency),
        "amount_due": format_money(row["amount_due"], currency),
        "due_date": row["due_date"].isoformat(),
        "closed_at": _utc(row["closed_at"]),
    }
    if layout == 1:
        return record
    corrects = row["corrects_month"]
    charge_columns = dict.fromkeys(COLUMNS_V3[len(COLUMNS_V2) :]) if layout == 3 else {}
    return {
        **record,
        # Rates as stored ("0.10"): a rate is not money and has no minor unit to round to.
        "tax_rate": str(row["tax_rate"]),
        "corrects_month": month_name(corrects) if corrects is not None else None,
        "billed_quantity": row["billed_quantity"],
        "corrected_quantity": row["corrected_quantity"],
        "line_tax_rate": None if row["line_tax_rate"] is None else str(row["line_tax_rate"]),
        **charge_columns,
    }


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _jsonl(records: Iterable[dict[str, Any]], columns: Sequence[str]) -> bytes:
    return b"".join(_json_line({k: r[k] for k in columns if k in r}) for r in records)


def _csv(records: Iterable[dict[str, Any]], columns: Sequence[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        writer.writerow(["" if r[k] is None else r[k] for k in columns])
    return out.getvalue().encode()


def _cloudevents(records: Iterable[dict[str, Any]]) -> bytes:
    """One CloudEvent 1.0 per line, structured mode, JSON format.

    The id names the statement line, not the export: a line is final, so exporting the month
    again (after another account closed, say) repeats each event with the same id and the
    same bytes, and a consumer that deduplicates on (source, id), as OpenMeter does, counts it
    once. For the same reason ``data`` leaves out the export id, which changes with the month.
    """
    return b"".join(
        _json_line(
            {
                "specversion": "1.0",
                "id": (
                    charge_key(str(r["account"]), int(r["charge_id"]))
                    if r.get("charge_id") is not None
                    else f"{statement_key(str(r['account']), r['month'])}:{r['line_no']}"
                ),
                "source": CLOUDEVENTS_SOURCE,
                "type": CHARGE_EVENT_TYPE if r.get("charge_id") is not None else CLOUDEVENTS_TYPE,
                "subject": r["account"],
                "time": r["closed_at"],
                "datacontenttype": "application/json",
                "data": {
                    k: r[k]
                    for k in (COLUMNS_V3 if r.get("charge_id") is not None else COLUMNS_V2)
                    if k in r
                },
            }
        )
        for r in records
    )
