"""The billing export across the 0012 upgrade, its v2 layout, CloudEvents, and the refusal of a
month that is not closed (SPEC C1-C3, P3-P4)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from cloudevents.core.formats.json import JSONFormat

from devmeter.config import SERVICE_ROLE
from devmeter.db import connect, service_url
from devmeter.errors import NotFoundError
from devmeter.migrate import migrate
from metering.catalog import load_catalog
from metering.export import COLUMNS_V1, COLUMNS_V2, export_month
from metering.registry import create_account, register_device
from metering.statements import close_month
from metering.webhook import deliver_due, enqueue
from tests.conftest import SERVICE_PASSWORD
from tests.integration.conftest import Receiver

CATALOG = load_catalog()
JST = ZoneInfo("Asia/Tokyo")
SECRET = b"whsec-test-upgrade-0b5e2a4c"

# What release 06ccbd3 (the last before migration 0012 could be applied) exported for the rows
# `close_as_0011` writes: produced by running that release's metering/export.py against them
# at schema 0011. Billing holds these bytes; no later release may change them.
CLOSED_AT = "2026-11-01T03:00:07.250001Z"
V1_EXPORT_ID = "dmx-2026-10-0f250740a0dfb8bf"
V1_CSV = (
    "export_id,account,month,currency,line_no,kind,device_class,description,quantity,"
    "unit_price,amount,subtotal,tax,credits_applied,amount_due,due_date,closed_at\n"
    f"{V1_EXPORT_ID},acme,2026-10,JPY,1,usage,lte-m,lte-m 1\u201310 \u00d7 300,10,300,3000,"
    f"3500,350,0,3850,2026-11-30,{CLOSED_AT}\n"
    f"{V1_EXPORT_ID},acme,2026-10,JPY,2,usage,lte-m,lte-m 11\u201312 \u00d7 250,2,250,500,"
    f"3500,350,0,3850,2026-11-30,{CLOSED_AT}\n"
    f"{V1_EXPORT_ID},quiet,2026-10,JPY,0,none,,no charges,0,,0,0,0,0,0,2026-11-30,{CLOSED_AT}\n"
).encode()
V1_CSV_SHA256 = "2c9b7102aeb317d75bd7ce88fc3f53c1972ae8154800ae846cdababd262379e2"


def v1_json_lines(export_id: str, accounts: tuple[str, ...]) -> bytes:
    acme = [
        (1, "lte-m 1\u201310 \u00d7 300", 10, "300", "3000"),
        (2, "lte-m 11\u201312 \u00d7 250", 2, "250", "500"),
    ]
    out = ""
    for line_no, description, quantity, unit_price, amount in acme if "acme" in accounts else []:
        out += (
            f'{{"export_id":"{export_id}","account":"acme","month":"2026-10","currency":"JPY",'
            f'"line_no":{line_no},"kind":"usage","device_class":"lte-m",'
            f'"description":"{description}","quantity":{quantity},"unit_price":"{unit_price}",'
            f'"amount":"{amount}","subtotal":"3500","tax":"350","credits_applied":"0",'
            f'"amount_due":"3850","due_date":"2026-11-30","closed_at":"{CLOSED_AT}"}}\n'
        )
    if "quiet" in accounts:
        out += (
            f'{{"export_id":"{export_id}","account":"quiet","month":"2026-10","currency":"JPY",'
            '"line_no":0,"kind":"none","device_class":null,"description":"no charges",'
            '"quantity":0,"unit_price":null,"amount":"0","subtotal":"0","tax":"0",'
            '"credits_applied":"0","amount_due":"0","due_date":"2026-11-30",'
            f'"closed_at":"{CLOSED_AT}"}}\n'
        )
    return out.encode()


V1_JSONL = v1_json_lines(V1_EXPORT_ID, ("acme", "quiet"))
#: The webhook's body for acme's statement alone (a one-statement export, so its own id).
V1_WEBHOOK_EXPORT_ID = "dmx-2026-10-9b81f9a074647eb1"
V1_WEBHOOK_BODY = v1_json_lines(V1_WEBHOOK_EXPORT_ID, ("acme",))


def close_as_0011(owner_url: str) -> None:
    """October 2026 closed the way the closer of schema 0011 stored it (17a45f8's
    ``_INSERT_SQL``): the worked example's acme (12 lte-m devices: 3,500 + 10 % tax) and an
    account without devices, whose statement has no lines. No devices are written: the
    statements are what the export reads."""
    with psycopg.connect(owner_url, autocommit=True) as conn, conn.transaction():
        for ref in ("acme", "quiet"):
            conn.execute(
                "INSERT INTO accounts (ref, name, plan, country, timezone, signed_up_on)"
                " VALUES (%s, %s, 'standard', 'JP', 'Asia/Tokyo', '2026-09-01')",
                (ref, ref.upper()),
            )
        for ref, subtotal, tax, closed_at in (
            ("acme", "3500", "350", CLOSED_AT),
            ("quiet", "0", "0", CLOSED_AT),
        ):
            conn.execute(
                """
                INSERT INTO statements (account_id, month, timezone, period_start, period_end,
                    plan, currency, subtotal, tax_rate, tax, credits_applied, amount_due,
                    due_date, closed_at, closed_by)
                SELECT id, '2026-10-01', 'Asia/Tokyo', '2026-09-30T15:00Z', '2026-10-31T15:00Z',
                    'standard', 'JPY', %(subtotal)s, 0.10, %(tax)s, 0,
                    %(subtotal)s::numeric + %(tax)s::numeric, '2026-11-30', %(closed_at)s,
                    'scheduler-host:4242'
                FROM accounts WHERE ref = %(ref)s
                """,
                {"ref": ref, "subtotal": subtotal, "tax": tax, "closed_at": closed_at},
            )
        conn.execute(
            """
            INSERT INTO statement_lines (statement_id, line_no, kind, device_class, description,
                quantity, unit_price, amount, tier, tier_from, tier_to)
            SELECT s.id, l.*
            FROM statements s JOIN accounts a ON a.id = s.account_id,
            (VALUES (1, 'usage', 'lte-m', %s, 10, 300, 3000, 1, 1, 10),
                    (2, 'usage', 'lte-m', %s, 2, 250, 500, 2, 11, 100))
                AS l(line_no, kind, device_class, description, quantity, unit_price, amount,
                     tier, tier_from, tier_to)
            WHERE a.ref = 'acme'
            """,
            ("lte-m 1\u201310 \u00d7 300", "lte-m 11\u201312 \u00d7 250"),
        )
        conn.execute(
            """
            INSERT INTO statement_peaks (statement_id, device_class, peak, peak_at, device_ids)
            SELECT s.id, 'lte-m', 12, '2026-10-05T00:00Z',
                   ARRAY(SELECT 'acme-d' || n FROM generate_series(1, 12) n)
            FROM statements s JOIN accounts a ON a.id = s.account_id WHERE a.ref = 'acme'
            """
        )


@pytest.fixture
def at_0011(empty_database_url: str) -> str:
    """A database left by the release before 0012, with October closed; the owner's URL."""
    result = migrate(empty_database_url, service_password=SERVICE_PASSWORD, target=11)
    assert result.current_version == 11
    with psycopg.connect(empty_database_url) as conn:
        assert (
            conn.execute(
                "SELECT 1 FROM information_schema.columns"
                " WHERE table_name = 'statements' AND column_name = 'format_version'"
            ).fetchone()
            is None
        )
    close_as_0011(empty_database_url)
    return empty_database_url


def as_service(owner_url: str) -> str:
    return service_url(owner_url, SERVICE_ROLE, SERVICE_PASSWORD)


def export(url: str, month: str, fmt: str, **kwargs: Any) -> Any:
    with connect(url) as conn:
        return export_month(conn, month, fmt, **kwargs)


def test_the_golden_bytes_are_what_release_06ccbd3_exported() -> None:
    # The literals above were copied from that release's output; this keeps them honest.
    assert hashlib.sha256(V1_CSV).hexdigest() == V1_CSV_SHA256
    assert hashlib.sha256(V1_JSONL).hexdigest() == (
        "37fee5ba08137ea0f884951912c3638e35476e71fa7061693537983c862e3c3d"
    )
    assert hashlib.sha256(V1_WEBHOOK_BODY).hexdigest() == (
        "411e0a16a36f2d6a63cc99067afa03c77f6c7df40b93b532e0aec6ca95de2d08"
    )


def test_statements_closed_before_0012_export_the_same_bytes_after_it(
    at_0011: str, receiver: Receiver
) -> None:
    # The delivery is queued by the old release's close and sent by the new release.
    with connect(at_0011) as conn, conn.transaction():
        row = conn.execute(
            "SELECT s.id FROM statements s JOIN accounts a ON a.id = s.account_id"
            " WHERE a.ref = 'acme'"
        ).fetchone()
        assert row is not None
        enqueue(conn, row["id"], receiver.url)

    upgraded = migrate(at_0011, service_password=SERVICE_PASSWORD)
    assert upgraded.applied[0] == "0012_billing_policies"
    url = as_service(at_0011)
    with connect(url) as conn:
        versions = conn.execute("SELECT format_version FROM statements").fetchall()
    assert [r["format_version"] for r in versions] == [1, 1]

    csv = export(url, "2026-10", "csv")
    assert csv.body == V1_CSV
    assert (csv.sha256, csv.export_id, csv.layout) == (V1_CSV_SHA256, V1_EXPORT_ID, 1)
    jsonl = export(url, "2026-10", "jsonl")
    assert (jsonl.body, jsonl.export_id) == (V1_JSONL, V1_EXPORT_ID)

    now = datetime.now(UTC) + timedelta(seconds=1)
    report = deliver_due(lambda: connect(url), secret=SECRET, now=lambda: now, timeout_s=5)
    assert report.delivered == 1, report
    [request] = receiver.requests
    assert request.body == V1_WEBHOOK_BODY
    assert request.headers["X-Devmeter-Export-Id"] == V1_WEBHOOK_EXPORT_ID
    assert request.headers["X-Devmeter-Checksum"] == (
        f"sha256={hashlib.sha256(V1_WEBHOOK_BODY).hexdigest()}"
    )


def test_a_month_closed_across_the_upgrade_exports_every_column(at_0011: str) -> None:
    """October gains a statement closed after 0012: the month turns to the v2 layout, where the
    v1 statements show their stored values; November carries an adjustment for October (C2),
    credit points (P4) and the tax rate (P3)."""
    migrate(at_0011, service_password=SERVICE_PASSWORD)
    url = as_service(at_0011)
    now = datetime(2026, 11, 22, tzinfo=UTC)
    with connect(url) as conn, conn.transaction():
        # P5: newco signs up in October on a plan whose sign-up month is free (a discount).
        create_account(
            conn,
            CATALOG,
            ref="newco",
            name="NEWCO",
            plan="starter",
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=date(2026, 10, 1),
        )
        for n in range(1, 5):
            register_device(
                conn,
                CATALOG,
                account_ref="newco",
                device_class="lte-m",
                device_id=f"n{n}",
                at=datetime(2026, 10, 3, tzinfo=JST),
            )
        # acme's 13 devices arrive after October was billed at 12: late data for October.
        for n in range(1, 14):
            register_device(
                conn,
                CATALOG,
                account_ref="acme",
                device_class="lte-m",
                device_id=f"acme-d{n}",
                at=datetime(2026, 10, 2, tzinfo=JST),
            )
        acme = conn.execute("SELECT * FROM accounts WHERE ref = 'acme'").fetchone()
        assert acme is not None
    opener = lambda: connect(url)  # noqa: E731
    october = close_month(opener, CATALOG, "2026-10", now=now)
    assert (october.closed, october.already_closed) == (["newco"], ["acme", "quiet"])

    mixed = export(url, "2026-10", "csv")
    assert mixed.layout == 2
    header, *rows = [line.split(",") for line in mixed.body.decode().splitlines()]
    assert tuple(header) == COLUMNS_V2
    assert header[: len(COLUMNS_V1)] == list(COLUMNS_V1)
    old_rows = [line.split(",") for line in V1_CSV.decode().splitlines()[1:]]
    v1_width = len(COLUMNS_V1)
    by_account = [r for r in rows if r[1] in ("acme", "quiet")]
    # The stored values, in the v1 columns' places, then the statement's rate and no adjustment.
    assert [r[1:v1_width] for r in by_account] == [r[1:] for r in old_rows]
    assert [r[v1_width:] for r in by_account] == [["0.10", "", "", "", ""]] * 3
    newco = [dict(zip(header, r, strict=True)) for r in rows if r[1] == "newco"]
    assert [(r["kind"], r["amount"], r["subtotal"]) for r in newco] == [
        ("usage", "0", "0"),
        ("usage", "300", "0"),
        ("discount", "-300", "0"),
    ]
    # The webhook of a v1 statement is a one-statement export: still its v1 bytes.
    with connect(url) as conn:
        row = conn.execute(
            "SELECT s.id FROM statements s JOIN accounts a ON a.id = s.account_id"
            " WHERE a.ref = 'acme'"
        ).fetchone()
        assert row is not None
        assert export_month(conn, "2026-10", "jsonl", statement_id=row["id"]).body == (
            V1_WEBHOOK_BODY
        )

    from metering import credits
    from metering.registry import Account

    with connect(url) as conn, conn.transaction():
        credits.grant(
            conn,
            Account(**acme),
            points=1000,
            reason="welcome",
            expires_on=date(2026, 12, 31),
            at=datetime(2026, 11, 2, tzinfo=JST),
            now=now,
        )
    november = close_month(opener, CATALOG, "2026-11", now=datetime(2026, 12, 2, tzinfo=UTC))
    assert "acme" in november.closed, november
    records = [json.loads(line) for line in export(url, "2026-11", "jsonl").body.splitlines()]
    acme_lines = [r for r in records if r["account"] == "acme"]
    assert [(r["kind"], r["quantity"], r["amount"]) for r in acme_lines] == [
        ("usage", 10, "3000"),
        ("usage", 3, "750"),
        ("adjustment", 1, "250"),
    ]
    adjustment = acme_lines[2]
    assert {k: adjustment[k] for k in COLUMNS_V2[len(COLUMNS_V1) :]} == {
        "tax_rate": "0.10",
        "corrects_month": "2026-10",
        "billed_quantity": 12,
        "corrected_quantity": 13,
        "line_tax_rate": "0.10",
    }
    totals = ("subtotal", "tax_rate", "tax", "credits_applied", "amount_due")
    assert {k: adjustment[k] for k in totals} == {
        "subtotal": "4000",
        "tax_rate": "0.10",
        "tax": "400",
        "credits_applied": "1000",
        "amount_due": "3400",
    }
    assert [r["line_tax_rate"] for r in acme_lines[:2]] == [None, None]
    assert list(adjustment) == list(COLUMNS_V2)

    # The same November as CloudEvents, read back with the CloudEvents SDK.
    first = export(url, "2026-11", "cloudevents")
    again = export(url, "2026-11", "cloudevents")
    assert first.body == again.body
    assert first.filename == "devmeter-2026-11.cloudevents.jsonl"
    events = [JSONFormat().read(None, line) for line in first.body.splitlines()]
    assert len(events) == len(records) == first.rows
    closed_at = datetime.fromisoformat(records[0]["closed_at"])
    for event, record in zip(events, records, strict=True):
        attributes = event.get_attributes()
        line = f"dmstmt-{record['account']}-2026-11:{record['line_no']}"
        assert {k: v for k, v in attributes.items() if k != "time"} == {
            "specversion": "1.0",
            "id": line,
            "source": "devmeter",
            "type": "devmeter.statement.line",
            "subject": record["account"],
            "datacontenttype": "application/json",
        }
        if record["account"] == "acme":
            assert attributes["time"] == closed_at
        # The event's data is the export's row without the export id, which changes with the
        # month's content while the line does not.
        assert event.get_data() == {k: v for k, v in record.items() if k != "export_id"}
    assert len({e.get_attributes()["id"] for e in events}) == len(events)


def accounts_in(url: str, zones: dict[str, str]) -> None:
    with connect(url) as conn, conn.transaction():
        for ref, zone in zones.items():
            create_account(
                conn,
                CATALOG,
                ref=ref,
                name=ref.upper(),
                plan="standard",
                country="JP",
                timezone=zone,
                signed_up_on=date(2026, 9, 1),
            )


def refusal(url: str, month: str, now: datetime) -> str:
    with pytest.raises(NotFoundError) as raised:
        export(url, month, "csv", now=now, grace=timedelta(minutes=120))
    message = str(raised.value)
    assert "close the month first" in message
    assert "\n" not in message
    return message


def test_an_open_month_is_refused_with_the_instant_it_can_be_closed(database_url: str) -> None:
    accounts_in(database_url, {"acme": "Asia/Tokyo"})
    # October ends at 2026-10-31T15:00Z in Tokyo; two hours' grace for late heartbeats.
    during = refusal(database_url, "2026-10", datetime(2026, 10, 20, tzinfo=UTC))
    assert during == (
        "no closed statements for 2026-10: the month is not closable yet; close the month "
        "first: devmeter close --month 2026-10 can close it from 2026-11-01T02:00:00+09:00 (its "
        "end in Asia/Tokyo plus 120 min grace for late heartbeats)"
    )
    in_grace = refusal(database_url, "2026-10", datetime(2026, 10, 31, 16, tzinfo=UTC))
    assert in_grace == during
    after = refusal(database_url, "2026-10", datetime(2026, 11, 1, tzinfo=UTC))
    assert after == (
        "no closed statements for 2026-10: close the month first (devmeter close --month "
        "2026-10; closable since 2026-11-01T02:00:00+09:00)"
    )
    with pytest.raises(NotFoundError, match="no account had signed up by then"):
        export(database_url, "2026-08", "csv")


def test_an_open_month_in_several_zones_names_the_first_and_the_last_end(
    database_url: str,
) -> None:
    accounts_in(
        database_url,
        {"acme": "Asia/Tokyo", "lax": "America/Los_Angeles", "ldn": "Europe/London"},
    )
    before = refusal(database_url, "2026-10", datetime(2026, 10, 20, tzinfo=UTC))
    # Tokyo's October ends first, Los Angeles' last: at 07:00Z, still in PDT; two hours later
    # the zone has left daylight saving time, so the instant reads 01:00 PST.
    assert before.endswith(
        "can close it from 2026-11-01T02:00:00+09:00 in Asia/Tokyo, for all accounts from "
        "2026-11-01T01:00:00-08:00 (its end in America/Los_Angeles plus 120 min grace for late "
        "heartbeats)"
    )
    between = refusal(database_url, "2026-10", datetime(2026, 11, 1, 3, tzinfo=UTC))
    assert "not closable yet in America/Los_Angeles" in between
    assert "can close it for some accounts now, for all from 2026-11-01T01:00:00-08:00" in between
    after = refusal(database_url, "2026-10", datetime(2026, 11, 1, 9, tzinfo=UTC))
    assert after.endswith("closable since 2026-11-01T01:00:00-08:00)")
