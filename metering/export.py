"""The monthly export to the billing system (SPEC C3): closed statements as CSV or JSON Lines.

Byte-stable by construction: only final statements go in (they never change), rows are
ordered by account ref and line number, money is written as exact decimal strings and times
in UTC with a ``Z``. So the same closed month always exports the same bytes, the checksum is
reproducible, and the export id, derived from the content, names exactly this content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import dict_row

from devmeter.errors import InvalidError, NotFoundError
from metering.pricing import format_money
from metering.statements import month_start

Format = Literal["csv", "jsonl"]
FORMATS: Final = ("csv", "jsonl")

#: Column order of both formats. A statement without lines (no devices, no base fee) still
#: appears, as one row with line_no 0 and kind "none", so billing sees every closed account.
COLUMNS: Final = (
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


@dataclass(frozen=True, slots=True)
class Export:
    export_id: str
    month: str
    format: Format
    body: bytes
    sha256: str
    rows: int
    statements: int

    @property
    def media_type(self) -> str:
        return "text/csv; charset=utf-8" if self.format == "csv" else "application/x-ndjson"

    @property
    def filename(self) -> str:
        return f"devmeter-{self.month}.{self.format}"


_ROWS_SQL: Final = """
SELECT a.ref AS account, s.id AS statement_id, s.currency, s.subtotal, s.tax,
       s.credits_applied, s.amount_due, s.due_date, s.closed_at,
       l.line_no, l.kind, l.device_class, l.description, l.quantity, l.unit_price, l.amount
FROM statements s
JOIN accounts a ON a.id = s.account_id
LEFT JOIN statement_lines l ON l.statement_id = s.id
WHERE s.month = %(month)s AND (%(statement_id)s::bigint IS NULL OR s.id = %(statement_id)s)
ORDER BY a.ref, l.line_no
"""


def export_month(
    conn: psycopg.Connection[Any], month: str, fmt: str, *, statement_id: int | None = None
) -> Export:
    """All final statements of ``month`` (or one, for its webhook) in ``fmt``."""
    if fmt not in FORMATS:
        raise InvalidError(f"unknown format {fmt!r}: expected csv or jsonl", field="format")
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            _ROWS_SQL, {"month": month_start(month), "statement_id": statement_id}
        ).fetchall()
    if not rows:
        raise NotFoundError(
            f"no closed statements for {month}: close the month first (devmeter close --month "
            f"{month})",
            field="month",
        )
    records = [_record(month, row) for row in rows]
    # The id names the content, independent of the format it is written in.
    digest = hashlib.sha256(_jsonl(records)).hexdigest()
    export_id = f"dmx-{month}-{digest[:16]}"
    records = [{"export_id": export_id, **r} for r in records]
    body = _csv(records) if fmt == "csv" else _jsonl(records)
    return Export(
        export_id=export_id,
        month=month,
        format=fmt,  # type: ignore[arg-type]  # checked against FORMATS above
        body=body,
        sha256=hashlib.sha256(body).hexdigest(),
        rows=len(records),
        statements=len({row["statement_id"] for row in rows}),
    )


def _record(month: str, row: dict[str, Any]) -> dict[str, str | int | None]:
    currency = row["currency"]
    has_line = row["line_no"] is not None
    return {
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


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(
        json.dumps(
            {k: r[k] for k in COLUMNS if k in r}, ensure_ascii=False, separators=(",", ":")
        ).encode()
        + b"\n"
        for r in records
    )


def _csv(records: Iterable[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        writer.writerow(["" if r[k] is None else r[k] for k in COLUMNS])
    return out.getvalue().encode()
