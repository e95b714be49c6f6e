"""History import (devices.csv, events.csv) against a real PostgreSQL: the SPEC's worked example,
every refusal with its line number and nothing written, and a large file."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devmeter.db import connect
from devmeter.errors import InvalidError
from metering.catalog import Catalog, load_catalog
from metering.importer import ImportResult, ImportRowError, import_history
from metering.registry import create_account, register_device, set_device_state
from tests.conftest import Cli, seed_fleet

JST = "+09:00"
# Before the worked example, so pre-existing devices can carry older history.
SEEDED_AT = datetime(2026, 9, 1, tzinfo=UTC)

DEVICES_HEADER = "device_id,account,class,registered_at"
EVENTS_HEADER = "time,device_id,state,source"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def acme(database_url: str) -> str:
    """The SPEC's account `acme` (plan standard) with existing devices `old1` and gateway `gw0`."""
    seed_fleet(database_url, [("old1", "lte-m", None), ("gw0", "gateway", None)], SEEDED_AT)
    return database_url


def _csv(directory: Path, name: str, *lines: str) -> Path:
    path = directory / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _import(
    url: str, catalog: Catalog, *, devices: Path | None = None, events: Path | None = None
) -> ImportResult:
    with connect(url) as conn, conn.transaction():
        return import_history(conn, catalog, devices=devices, events=events)


def _snapshot(url: str) -> tuple[object, ...]:
    with connect(url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM devices) AS devices, "
            "(SELECT count(*) FROM device_state_events) AS events"
        ).fetchone()
        states = conn.execute("SELECT id, state, state_at FROM devices ORDER BY id").fetchall()
    assert counts is not None
    return counts["devices"], counts["events"], tuple(tuple(s.values()) for s in states)


def _refused(
    url: str, catalog: Catalog, *, devices: Path | None = None, events: Path | None = None
) -> ImportRowError:
    before = _snapshot(url)
    with pytest.raises(ImportRowError) as caught:
        _import(url, catalog, devices=devices, events=events)
    assert _snapshot(url) == before
    return caught.value


def _worked_example(directory: Path) -> tuple[Path, Path]:
    devices = [DEVICES_HEADER]
    devices += [f"d{i},acme,lte-m,2026-09-30T10:00:00{JST}" for i in range(1, 9)]
    devices += [f"d{i},acme,lte-m,2026-10-05T09:00:00{JST}" for i in range(9, 13)]
    devices += [f"d{i},acme,lte-m,2026-10-20T08:00:00{JST}" for i in range(13, 17)]
    devices += [f"d17,acme,lte-m,2026-10-31T23:59:59{JST}"]
    events = [EVENTS_HEADER]
    events += [f"2026-10-10T12:00:00{JST},d{i},inactive,console" for i in range(1, 5)]
    events += [f"2026-10-25T18:00:00{JST},d5,inactive,heartbeat", ""]  # blank last line: fine
    return _csv(directory, "devices.csv", *devices), _csv(directory, "events.csv", *events)


def _active_at(url: str, at: datetime) -> int:
    """D3: a device's state at `at` is that of its latest event at or before `at`."""
    with connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM ("
            "  SELECT DISTINCT ON (device_id) state FROM device_state_events"
            "  WHERE time <= %s AND device_id ~ '^d[0-9]+$'"
            "  ORDER BY device_id, time DESC, id DESC"
            ") latest WHERE state = 'active'",
            (at,),
        ).fetchone()
    assert row is not None
    return int(row["n"])


def _jst(text: str) -> datetime:
    return datetime.fromisoformat(text + JST)


# --- the worked example ----------------------------------------------------------------------


def test_worked_example_imports_registrations_and_events(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    devices, events = _worked_example(tmp_path)
    seen: list[tuple[str, int, int]] = []

    with connect(acme) as conn, conn.transaction():
        result = import_history(
            conn,
            catalog,
            devices=devices,
            events=events,
            progress=lambda label, done, total: seen.append((label, done, total)),
        )

    assert (result.devices, result.events, result.registration_events, result.accounts) == (
        17,
        5,
        17,
        1,
    )
    assert result.seconds >= 0
    assert seen == [
        ("devices.csv", devices.stat().st_size, devices.stat().st_size),
        ("events.csv", events.stat().st_size, events.stat().st_size),
    ]
    with connect(acme) as conn:
        registrations = conn.execute(
            "SELECT device_id, time, state, source, device_class FROM device_state_events "
            "WHERE device_id ~ '^d[0-9]+$' AND source = 'import' ORDER BY time, device_id"
        ).fetchall()
        imported = conn.execute(
            "SELECT device_id, time, state, source FROM device_state_events "
            "WHERE source <> 'import' AND device_id ~ '^d[0-9]+$' ORDER BY time, device_id"
        ).fetchall()
        devices_rows = {
            r["id"]: r
            for r in conn.execute(
                "SELECT id, state, state_at, registered_at, key_prefix, key_hash, gateway_id "
                "FROM devices WHERE id ~ '^d[0-9]+$'"
            )
        }
        storage = conn.execute(
            "SELECT value FROM devmeter_meta WHERE key = 'storage_mode'"
        ).fetchone()
        assert storage is not None
        if storage["value"] == "plain":
            # The importer made the months' partitions before writing.
            default = conn.execute("SELECT count(*) AS n FROM device_state_events_default")
            assert default.fetchone() == {"n": 0}

    assert len(registrations) == 17
    assert {(r["state"], r["device_class"]) for r in registrations} == {("active", "lte-m")}
    assert registrations[0]["time"] == datetime(2026, 9, 30, 1, 0, tzinfo=UTC)  # normalised
    assert registrations[-1] == {
        "device_id": "d17",
        "time": _jst("2026-10-31T23:59:59"),
        "state": "active",
        "source": "import",
        "device_class": "lte-m",
    }
    assert [(r["device_id"], r["state"], r["source"]) for r in imported] == [
        ("d1", "inactive", "console"),
        ("d2", "inactive", "console"),
        ("d3", "inactive", "console"),
        ("d4", "inactive", "console"),
        ("d5", "inactive", "heartbeat"),
    ]
    assert imported[4]["time"] == _jst("2026-10-25T18:00:00")

    assert len(devices_rows) == 17
    for i in range(1, 18):
        row = devices_rows[f"d{i}"]
        if i <= 4:
            assert (row["state"], row["state_at"]) == ("inactive", _jst("2026-10-10T12:00:00"))
        elif i == 5:
            assert (row["state"], row["state_at"]) == ("inactive", _jst("2026-10-25T18:00:00"))
        else:
            assert (row["state"], row["state_at"]) == ("active", row["registered_at"])
        assert row["key_prefix"].startswith("dmk_")
        assert row["gateway_id"] is None
    # A fresh key each, kept only as a hash.
    hashes = {bytes(r["key_hash"]) for r in devices_rows.values()}
    assert len(hashes) == 17
    assert all(len(h) == 32 for h in hashes)

    # The SPEC's table, row by row.
    assert _active_at(acme, _jst("2026-09-30T10:00:00")) == 8
    assert _active_at(acme, _jst("2026-10-05T09:00:00")) == 12
    assert _active_at(acme, _jst("2026-10-10T12:00:00")) == 8
    assert _active_at(acme, _jst("2026-10-20T08:00:00")) == 12
    assert _active_at(acme, _jst("2026-10-25T18:00:00")) == 11
    assert _active_at(acme, _jst("2026-10-31T23:59:59")) == 12
    assert _active_at(acme, _jst("2026-11-01T00:00:00")) == 12


def test_cli_import_prints_the_result_as_json(cli: Cli, database_url: str, tmp_path: Path) -> None:
    seed_fleet(database_url, [], SEEDED_AT)
    devices, events = _worked_example(tmp_path)

    result = cli("import", "--devices", str(devices), "--events", str(events))

    assert result.code == 0, result.stderr
    body = result.json()
    assert isinstance(body, dict)
    assert {k: body[k] for k in ("devices", "events", "registration_events", "accounts")} == {
        "devices": 17,
        "events": 5,
        "registration_events": 17,
        "accounts": 1,
    }
    assert "dmk_" not in result.stdout + result.stderr  # keys are never printed


def test_cli_refuses_a_bad_row_and_writes_nothing(
    cli: Cli, database_url: str, tmp_path: Path
) -> None:
    seed_fleet(database_url, [], SEEDED_AT)
    devices, _ = _worked_example(tmp_path)
    events = _csv(tmp_path, "events.csv", EVENTS_HEADER, f"2026-10-10T12:00:00{JST},x9,inactive,")
    before = _snapshot(database_url)

    result = cli("import", "--devices", str(devices), "--events", str(events))

    assert result.code == 2
    assert "events.csv line 2: unknown device 'x9'" in result.stderr
    assert _snapshot(database_url) == before


# --- what the import adds to existing devices ------------------------------------------------


def test_events_of_existing_devices_follow_the_latest_event_by_time(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    # old1 was registered active on 2026-09-01; a later console event makes it inactive.
    with connect(acme) as conn, conn.transaction():
        set_device_state(
            conn, device_id="old1", state="inactive", at=_jst("2026-10-01T00:00:00"), source="cli"
        )
    events = _csv(
        tmp_path,
        "events.csv",
        "time,device_id,state",  # the optional source column left out: 'import'
        f"2026-09-15T00:00:00{JST},old1,active",  # older than its inactive: changes nothing now
        f"2026-09-20T00:00:00{JST},gw0,inactive",
        f"2026-09-20T00:00:00{JST},gw0,active",  # same instant: the later line wins
    )

    result = _import(acme, catalog, events=events)

    assert (result.devices, result.events, result.registration_events, result.accounts) == (
        0,
        3,
        0,
        1,
    )
    with connect(acme) as conn:
        states = {
            r["id"]: (r["state"], r["state_at"])
            for r in conn.execute("SELECT id, state, state_at FROM devices")
        }
        sources = conn.execute(
            "SELECT DISTINCT source FROM device_state_events WHERE time < %s AND time > %s",
            (_jst("2026-10-01T00:00:00"), SEEDED_AT),
        ).fetchall()
    assert states["old1"] == ("inactive", _jst("2026-10-01T00:00:00"))
    assert states["gw0"] == ("active", _jst("2026-09-20T00:00:00"))
    assert sources == [{"source": "import"}]


def test_devices_may_be_bound_to_a_gateway_existing_or_listed_earlier(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    at = f"2026-10-01T00:00:00{JST}"
    devices = _csv(
        tmp_path,
        "devices.csv",
        DEVICES_HEADER + ",gateway",
        f"gw1,acme,gateway,{at},",
        f"c1,acme,lte-m,{at},gw1",
        f"c2,acme,wifi,{at},gw0",
    )

    _import(acme, catalog, devices=devices)

    with connect(acme) as conn:
        bound = conn.execute(
            "SELECT id, gateway_id FROM devices WHERE id IN ('gw1', 'c1', 'c2') ORDER BY id"
        ).fetchall()
    assert [(r["id"], r["gateway_id"]) for r in bound] == [
        ("c1", "gw1"),
        ("c2", "gw0"),
        ("gw1", None),
    ]


def test_a_refused_import_leaves_the_callers_transaction_usable(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    # Refused in the middle of copying events into the stage, the hardest place to back out of.
    bad = _csv(
        tmp_path,
        "bad.csv",
        EVENTS_HEADER,
        f"2026-10-02T00:00:00{JST},old1,inactive,",
        f"2026-10-03T00:00:00{JST},x9,inactive,",
    )
    good = _csv(tmp_path, "good.csv", EVENTS_HEADER, f"2026-10-02T00:00:00{JST},old1,inactive,")

    with connect(acme) as conn, conn.transaction():
        with pytest.raises(ImportRowError, match="line 3: unknown device 'x9'"):
            import_history(conn, catalog, events=bad)
        result = import_history(conn, catalog, events=good)

    assert result.events == 1
    with connect(acme) as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM device_state_events WHERE device_id = 'old1'"
        ).fetchone()
    assert row == {"n": 2}  # its registration and the one good event


# --- refusals: the first bad row, its line, and nothing written ------------------------------

GOOD_DEVICE = f"n1,acme,lte-m,2026-10-01T00:00:00{JST}"


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        pytest.param(
            ["device_id,account,klass,registered_at", GOOD_DEVICE],
            1,
            "header must be device_id,account,class,registered_at[,gateway], got "
            "'device_id,account,klass,registered_at'",
            id="bad-header",
        ),
        pytest.param(
            [DEVICES_HEADER + ",gateway,name", GOOD_DEVICE + ",,x"],
            1,
            "header must be",
            id="unknown-column",
        ),
        pytest.param([], 1, "empty file", id="empty-file"),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, "n2,acme,lte-m"],
            3,
            "expected 4 fields (device_id,account,class,registered_at), got 3",
            id="too-few-fields",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE + ",gw0"],
            2,
            "expected 4 fields",
            id="gateway-without-header-column",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, "n2,acme,lte-m,2026-10-01T00:00:00"],
            3,
            "registered_at '2026-10-01T00:00:00' has no UTC offset",
            id="naive-time",
        ),
        pytest.param(
            [DEVICES_HEADER, "n2,acme,lte-m,yesterday"],
            2,
            "registered_at 'yesterday' is not an ISO 8601 time",
            id="not-a-time",
        ),
        pytest.param(
            [DEVICES_HEADER, "n2,acme,lte-m,2099-01-01T00:00:00Z"],
            2,
            "registered_at '2099-01-01T00:00:00Z' is in the future",
            id="future-time",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, f"n2,globex,lte-m,2026-10-01T00:00:00{JST}"],
            3,
            "unknown account 'globex'",
            id="unknown-account",
        ),
        pytest.param(
            [DEVICES_HEADER, f"n2,acme,satellite,2026-10-01T00:00:00{JST}"],
            2,
            "plan 'standard' of account 'acme' has no device class 'satellite' "
            "(it has: gateway, lte-m, wifi)",
            id="unknown-class",
        ),
        pytest.param(
            [DEVICES_HEADER, f"bad/id,acme,lte-m,2026-10-01T00:00:00{JST}"],
            2,
            "invalid device id 'bad/id'",
            id="bad-device-id",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, f"n2,acme,wifi,2026-10-01T00:00:00{JST}", GOOD_DEVICE],
            4,
            "device 'n1' is listed twice (first on line 2)",
            id="duplicate-in-file",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, f"old1,acme,lte-m,2026-10-01T00:00:00{JST}"],
            3,
            "device 'old1' already exists",
            id="duplicate-of-existing",
        ),
        pytest.param(
            [
                DEVICES_HEADER + ",gateway",
                GOOD_DEVICE + ",",
                GOOD_DEVICE.replace("n1", "n2") + ",n1",
            ],
            3,
            "gateway 'n1' is of class 'lte-m', not 'gateway'",
            id="gateway-not-a-gateway",
        ),
        pytest.param(
            [DEVICES_HEADER + ",gateway", GOOD_DEVICE + ",old1"],
            2,
            "gateway 'old1' is of class 'lte-m', not 'gateway'",
            id="existing-gateway-not-a-gateway",
        ),
        pytest.param(
            [
                DEVICES_HEADER + ",gateway",
                GOOD_DEVICE + ",gw9",
                f"gw9,acme,gateway,2026-10-01T00:00:00{JST},",
            ],
            2,
            "unknown gateway 'gw9': it must exist already or be listed on an earlier line",
            id="gateway-listed-later",
        ),
        pytest.param(
            [DEVICES_HEADER, GOOD_DEVICE, "", f"n2,acme,wifi,2026-10-01T00:00:00{JST}"],
            3,
            "blank line inside the file",
            id="blank-line-inside",
        ),
        pytest.param(
            [DEVICES_HEADER, 'n2,acme,"lte-m,2026-10-01T00:00:00+09:00'],
            2,
            "malformed CSV",
            id="unclosed-quote",
        ),
    ],
)
def test_a_bad_devices_file_is_refused_with_its_line(
    acme: str, catalog: Catalog, tmp_path: Path, lines: list[str], line: int, reason: str
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("".join(f"{text}\n" for text in lines), encoding="utf-8")

    error = _refused(acme, catalog, devices=path)

    assert (error.file, error.line, error.field) == ("devices.csv", line, "devices")
    assert error.reason.startswith(reason), error.reason
    assert str(error) == f"devices.csv line {line}: {error.reason}"


def test_a_device_of_another_account_is_no_gateway(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    with connect(acme) as conn, conn.transaction():
        create_account(
            conn,
            catalog,
            ref="globex",
            name="Globex",
            plan="standard",
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=SEEDED_AT.date(),
        )
        register_device(
            conn,
            catalog,
            account_ref="globex",
            device_class="gateway",
            device_id="ggw",
            at=SEEDED_AT,
        )
    devices = _csv(tmp_path, "devices.csv", DEVICES_HEADER + ",gateway", GOOD_DEVICE + ",ggw")

    error = _refused(acme, catalog, devices=devices)

    assert (error.line, error.reason.split(":")[0]) == (2, "unknown gateway 'ggw'")


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        pytest.param(
            ["time,device_id,state,source,extra"],
            1,
            "header must be time,device_id,state[,source][,account], "
            "got 'time,device_id,state,source,extra'",
            id="unknown-column",
        ),
        pytest.param(
            ["device_id,time,state"],
            1,
            "header must be time,device_id,state[,source][,account]",
            id="order",
        ),
        pytest.param(
            [EVENTS_HEADER, f"2026-10-02T00:00:00{JST},old1,inactive,api,extra"],
            2,
            "expected 4 fields (time,device_id,state,source), got 5",
            id="too-many-fields",
        ),
        pytest.param(
            [
                EVENTS_HEADER,
                f"2026-10-02T00:00:00{JST},old1,inactive,api",
                "2026-10-03,old1,active,",
            ],
            3,
            "time '2026-10-03' has no UTC offset",
            id="naive-time",
        ),
        pytest.param(
            [
                EVENTS_HEADER,
                f"2026-10-02T00:00:00{JST},old1,inactive,",
                "1999-12-31T23:00:00Z,old1,active,",
            ],
            3,
            "time '1999-12-31T23:00:00Z' is before 2000-01-01",
            id="ancient-time",
        ),
        pytest.param(
            [
                EVENTS_HEADER,
                f"2026-10-02T00:00:00{JST},old1,inactive,",
                f"2026-10-03T00:00:00{JST},x9,active,",
            ],
            3,
            "unknown device 'x9'",
            id="unknown-device",
        ),
        pytest.param(
            [EVENTS_HEADER, "0001-01-01T00:00:00+09:00,old1,active,"],
            2,
            "time '0001-01-01T00:00:00+09:00' is out of range",
            id="out-of-range-time",
        ),
        pytest.param(
            [EVENTS_HEADER, f"2026-10-02T00:00:00{JST},old1,off,"],
            2,
            "invalid state 'off': active or inactive",
            id="bad-state",
        ),
        pytest.param(
            [EVENTS_HEADER, f"2026-10-02T00:00:00{JST},old1,inactive,timeout"],
            2,
            "invalid source 'timeout': one of api, cli, console, gateway, heartbeat, import, "
            "registration",
            id="bad-source",
        ),
        pytest.param(
            [EVENTS_HEADER, f"2026-08-31T23:59:59{JST},old1,inactive,"],
            2,
            "event at 2026-08-31T14:59:59Z is before device 'old1' was registered "
            "(2026-09-01T00:00:00Z): billing counts a device from its registration (D1)",
            id="before-registration",
        ),
    ],
)
def test_a_bad_events_file_is_refused_with_its_line(
    acme: str, catalog: Catalog, tmp_path: Path, lines: list[str], line: int, reason: str
) -> None:
    path = _csv(tmp_path, "events.csv", *lines)

    error = _refused(acme, catalog, events=path)

    assert (error.file, error.line, error.field) == ("events.csv", line, "events")
    assert error.reason.startswith(reason), error.reason


def test_a_bad_events_file_refuses_the_devices_file_too(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    devices, _ = _worked_example(tmp_path)
    events = _csv(
        tmp_path,
        "events.csv",
        EVENTS_HEADER,
        f"2026-10-10T12:00:00{JST},d1,inactive,console",
        # d9 exists from devices.csv, but not yet on 2026-10-01.
        f"2026-10-01T00:00:00{JST},d9,inactive,console",
    )

    error = _refused(acme, catalog, devices=devices, events=events)

    assert str(error).startswith("events.csv line 3: event at 2026-09-30T15:00:00Z is before")


def test_a_suspended_account_gets_no_new_devices(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    with connect(acme) as conn, conn.transaction():
        conn.execute("UPDATE accounts SET status = 'suspended' WHERE ref = 'acme'")
    devices = _csv(tmp_path, "devices.csv", DEVICES_HEADER, GOOD_DEVICE)

    error = _refused(acme, catalog, devices=devices)

    assert (error.line, error.reason) == (
        2,
        "account 'acme' is suspended: devices cannot be registered",
    )


def test_a_spreadsheet_export_with_bom_and_crlf_is_read(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    text = f"time,device_id,state\r\n2026-10-02T00:00:00{JST},old1,inactive\r\n"
    path.write_bytes(text.encode("utf-8-sig"))

    result = _import(acme, catalog, events=path)

    assert result.events == 1


# --- a large file ----------------------------------------------------------------------------


def test_two_hundred_thousand_events_import_in_seconds(
    acme: str, catalog: Catalog, tmp_path: Path
) -> None:
    fleet, count = 1000, 200_000
    start = datetime(2026, 1, 1, tzinfo=UTC)
    devices = tmp_path / "devices.csv"
    with devices.open("w", encoding="utf-8") as out:
        out.write(DEVICES_HEADER + "\n")
        for i in range(fleet):
            out.write(f"m{i},acme,lte-m,{start.isoformat()}\n")
    events = tmp_path / "events.csv"
    step = timedelta(seconds=120)
    with events.open("w", encoding="utf-8") as out:
        out.write(EVENTS_HEADER + "\n")
        for i in range(count):
            state = "inactive" if (i // fleet) % 2 == 0 else "active"
            at = (start + step * (i + 1)).isoformat()
            out.write(f"{at},m{i % fleet},{state},heartbeat\n")
    started = time.perf_counter()

    result = _import(acme, catalog, devices=devices, events=events)

    elapsed = time.perf_counter() - started
    assert (result.devices, result.events, result.registration_events) == (fleet, count, fleet)
    with connect(acme) as conn:
        totals = conn.execute(
            "SELECT count(*) AS events, count(DISTINCT device_id) AS devices "
            "FROM device_state_events WHERE device_id LIKE 'm%'"
        ).fetchone()
        states = conn.execute(
            "SELECT state, count(*) AS n FROM devices WHERE id LIKE 'm%' GROUP BY state"
        ).fetchall()
    assert totals == {"events": count + fleet, "devices": fleet}
    # 200 rounds of the fleet, alternating inactive/active: the last round is active.
    assert states == [{"state": "active", "n": fleet}]
    # A generous bound: the point is "seconds, not minutes", even on a busy machine.
    assert elapsed < 30, f"200k events took {elapsed:.1f}s"


def test_a_missing_file_is_refused(acme: str, catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="cannot read"):
        _import(acme, catalog, events=tmp_path / "nope.csv")
    with pytest.raises(InvalidError, match="nothing to import"):
        _import(acme, catalog)
