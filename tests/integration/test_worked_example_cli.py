"""SPEC's worked example end to end through the CLI: import, close, statement, export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import Cli, InProcessCli
from tests.integration.test_ingest_worker import count


@pytest.fixture
def cli(cli: Cli) -> Cli:
    """The `devmeter` entry point run in this process: these tests make many calls
    (tests/conftest.py, InProcessCli)."""
    return InProcessCli(cli.env, cli.cwd)


DEVICES = ["device_id,account,class,registered_at"]
EVENTS = ["time,device_id,state,source"]
for account in ("acme", "vol"):
    DEVICES += [f"{account}-d{n},{account},lte-m,2026-09-30T10:00:00+09:00" for n in range(1, 9)]
    DEVICES += [f"{account}-d{n},{account},lte-m,2026-10-05T09:00:00+09:00" for n in range(9, 13)]
    DEVICES += [f"{account}-d{n},{account},lte-m,2026-10-20T08:00:00+09:00" for n in range(13, 17)]
    DEVICES += [f"{account}-d17,{account},lte-m,2026-10-31T23:59:59+09:00"]
    # Registered at 2026-11-01 01:00 in Tokyo: November's device, not October's.
    DEVICES += [f"{account}-d18,{account},lte-m,2026-10-31T16:00:00Z"]
    EVENTS += [f"2026-10-10T12:00:00+09:00,{account}-d{n},inactive,console" for n in range(1, 5)]
    EVENTS += [f"2026-10-25T18:00:00+09:00,{account}-d5,inactive,heartbeat"]


def ok(result: object) -> dict[str, object]:
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    body = result.json()  # type: ignore[attr-defined]
    assert isinstance(body, dict)
    return body


@pytest.fixture
def imported(cli: Cli, tmp_path: Path) -> Cli:
    for ref, plan in (("acme", "standard"), ("vol", "standard-volume")):
        ok(
            cli(
                "accounts",
                "create",
                "--ref",
                ref,
                "--name",
                ref.upper(),
                "--plan",
                plan,
                "--country",
                "JP",
                "--tz",
                "Asia/Tokyo",
                "--signed-up",
                "2026-09-01",
            )
        )
    devices, events = tmp_path / "devices.csv", tmp_path / "events.csv"
    devices.write_text("\n".join(DEVICES) + "\n")
    events.write_text("\n".join(EVENTS) + "\n")
    body = ok(cli("import", "--devices", str(devices), "--events", str(events)))
    assert (body["devices"], body["events"]) == (36, 10)
    return cli


def test_october_peaks_at_12_and_bills_3500_graduated_3000_volume(
    imported: Cli, tmp_path: Path
) -> None:
    cli = imported
    usage = ok(cli("usage", "--account", "acme", "--month", "2026-10", "--evidence"))
    assert usage["status"] == "preliminary"
    assert usage["classes"] == {
        "lte-m": {
            "peak": 12,
            "peak_at": "2026-10-05T00:00:00Z",
            "amount": "3500",
            "metric": "peak",
            "devices": sorted(f"acme-d{n}" for n in range(1, 13)),
        }
    }
    assert (usage["plan"], usage["subtotal"], usage["tax"], usage["total"]) == (
        "standard",
        "3500",
        "350",
        "3850",
    )

    # With a webhook configured, each statement closed is queued for delivery with it.
    hooked = Cli({**cli.env, "DEVMETER_WEBHOOK_URL": "http://127.0.0.1:9/billing"}, cli.cwd)
    closed = ok(hooked("close", "--month", "2026-10"))
    assert closed["closed"] == ["acme", "vol"]
    queued = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    assert count(cli.env["DEVMETER_DATABASE_URL"], queued) == 2
    assert ok(cli("close", "--month", "2026-10"))["already_closed"] == ["acme", "vol"]

    statement = ok(cli("statement", "--account", "acme", "--month", "2026-10"))
    assert {k: statement[k] for k in ("status", "currency", "subtotal", "due_date")} == {
        "status": "final",
        "currency": "JPY",
        "subtotal": "3500",
        "due_date": "2026-11-30",
    }
    assert [(x["quantity"], x["unit_price"], x["amount"]) for x in statement["lines"]] == [  # type: ignore[attr-defined]
        (10, "300", "3000"),
        (2, "250", "500"),
    ]
    assert statement["usage"] == {
        "lte-m": {"peak": 12, "peak_at": "2026-10-05T00:00:00Z", "amount": "3500"}
    }
    volume = ok(cli("statement", "--account", "vol", "--month", "2026-10"))
    assert volume["subtotal"] == "3000"
    assert [(x["quantity"], x["unit_price"]) for x in volume["lines"]] == [(12, "250")]  # type: ignore[attr-defined]

    november = ok(cli("usage", "--account", "acme", "--month", "2026-11"))
    assert november["status"] == "preliminary"
    assert november["classes"]["lte-m"]["peak"] == 13  # type: ignore[index]

    out = tmp_path / "october.csv"
    first = ok(cli("export", "--month", "2026-10", "--format", "csv", "--out", str(out)))
    data = out.read_bytes()
    assert first["sha256"] == hashlib.sha256(data).hexdigest()
    assert first["rows"] == 3
    again = ok(cli("export", "--month", "2026-10", "--format", "csv", "--out", str(out)))
    assert again["sha256"] == first["sha256"]
    assert out.read_bytes() == data
    to_stdout = cli("export", "--month", "2026-10", "--format", "jsonl")
    assert to_stdout.code == 0
    assert to_stdout.stdout.count("\n") == 3
    assert '"tax":"350","credits_applied":"0","amount_due":"3850"' in to_stdout.stdout
    assert '"tax_rate":"0.10"' in to_stdout.stdout
    events = ok(cli("export", "--month", "2026-10", "--format", "cloudevents", "--out", str(out)))
    assert (events["format"], events["rows"], events["export_id"]) == (
        "cloudevents",
        3,
        first["export_id"],
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["specversion"], e["id"], e["subject"]) for e in lines] == [
        ("1.0", "dmstmt-acme-2026-10:1", "acme"),
        ("1.0", "dmstmt-acme-2026-10:2", "acme"),
        ("1.0", "dmstmt-vol-2026-10:1", "vol"),
    ]


def test_refusals_are_one_line(imported: Cli) -> None:
    cli = imported
    for args, message in [
        (("close", "--month", "2026-13"), "month must be 01 to 12"),
        (("close", "--month", "2026-10", "--account", "nobody"), "unknown account"),
        (("export", "--month", "2026-10"), "close the month first"),
        (("export", "--month", "2030-01"), "from 2030-02-01T02:00:00+09:00 (its end in Asia"),
        (("statement", "--account", "acme", "--month", "2030-01"), "has not started yet"),
        (("usage", "--account", "acme", "--month", "October"), "YYYY-MM"),
    ]:
        result = cli(*args)
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_worked_example_ends_at_2850_after_1000_points(imported: Cli) -> None:
    """SPEC's worked example through the CLI: subtotal 3,500, tax 350, points 1,000, due 2,850."""
    cli = imported
    granted = ok(
        cli(
            "credits",
            "grant",
            "--account",
            "acme",
            "--points",
            "1000",
            "--reason",
            "welcome",
            "--expires",
            "2026-10-31",
            "--at",
            "2026-10-01T09:00:00",
        )
    )
    assert granted["balance"] == "1000"
    assert granted["granted"]["expires_on"] == "2026-10-31"  # type: ignore[index]
    ok(cli("close", "--month", "2026-10", "--account", "acme"))
    statement = ok(cli("statement", "--account", "acme", "--month", "2026-10"))
    totals = ("subtotal", "tax_rate", "tax", "credits_applied", "amount_due")
    assert {k: statement[k] for k in totals} == {
        "subtotal": "3500",
        "tax_rate": "0.10",
        "tax": "350",
        "credits_applied": "1000",
        "amount_due": "2850",
    }
    balance = ok(cli("credits", "balance", "--account", "acme"))
    assert balance["balance"] == "0"
    assert [(e["kind"], e["points"], e["month"]) for e in balance["ledger"]] == [  # type: ignore[attr-defined]
        ("grant", "1000", None),
        ("use", "-1000", "2026-10"),
    ]


def test_the_demo_ends_with_a_closed_statement_with_tax_and_points(cli: Cli) -> None:
    made = ok(cli("demo"))
    statement = made["statement"]
    assert isinstance(statement, dict)
    assert made["owner_key"].startswith("dma_")  # type: ignore[attr-defined]
    assert statement["status"] == "final"
    assert statement["month"] == made["month"]
    totals = ("subtotal", "tax", "credits_applied", "amount_due")
    assert [statement[k] for k in totals] == ["3500", "350", "1000", "2850"]
    again = cli("demo")
    assert again.code == 2
    assert "already exists" in again.stderr
