"""The registry through the real `devmeter` command against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.conftest import Cli, InProcessCli


@pytest.fixture
def cli(cli: Cli) -> Cli:
    """The `devmeter` entry point run in this process: these tests make many calls
    (tests/conftest.py, InProcessCli)."""
    return InProcessCli(cli.env, cli.cwd)


def _create_acme(cli: Cli, **extra: str) -> dict[str, object]:
    args = [
        "accounts",
        "create",
        "--ref",
        "acme",
        "--name",
        "ACME",
        "--plan",
        "standard",
        "--country",
        "JP",
        "--signed-up",
        "2026-09-01",
    ]
    for key, value in extra.items():
        args += [f"--{key}", value]
    result = cli(*args)
    assert result.code == 0, result.stderr
    body = result.json()
    assert isinstance(body, dict)
    return body


def _snapshot(url: str) -> tuple[object, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM members), "
            "(SELECT count(*) FROM api_keys), (SELECT count(*) FROM devices), "
            "(SELECT count(*) FROM device_state_events)"
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_account_create_prints_owner_key_once_and_stores_only_its_hash(
    cli: Cli, database_url: str
) -> None:
    body = _create_acme(cli)

    assert body["ref"] == "acme"
    key = body["api_key"]
    assert isinstance(key, str)
    assert key.startswith("dma_")
    assert len(key) > 40
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT a.timezone, a.signed_up_on::text, m.role, k.prefix, k.key_hash "
            "FROM accounts a JOIN members m ON m.account_id = a.id "
            "JOIN api_keys k ON k.member_id = m.id"
        ).fetchall()
        everything = conn.execute(
            "SELECT string_agg(t::text, '') FROM (SELECT * FROM api_keys) t"
        ).fetchone()
    assert len(stored) == 1
    tz, signed_up, role, prefix, key_hash = stored[0]
    assert (tz, signed_up, role) == ("Asia/Tokyo", "2026-09-01", "owner")
    assert key.startswith(prefix)
    assert len(prefix) < 12
    import hashlib

    assert bytes(key_hash) == hashlib.sha256(key.encode()).digest()
    assert everything is not None
    assert key not in str(everything[0])


def test_register_device_records_active_event_at_registration_instant(
    cli: Cli, database_url: str
) -> None:
    _create_acme(cli)
    before = datetime.now(UTC)
    result = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
    after = datetime.now(UTC)

    assert result.code == 0, result.stderr
    body = result.json()
    assert isinstance(body, dict)
    assert (body["id"], body["state"]) == ("d1", "active")
    assert str(body["key"]).startswith("dmk_")
    registered_at = datetime.fromisoformat(str(body["registered_at"]))
    assert before - timedelta(seconds=1) <= registered_at <= after
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT time, state, source FROM device_state_events WHERE device_id = 'd1'"
        ).fetchall()
        device = conn.execute("SELECT state, state_at FROM devices WHERE id = 'd1'").fetchone()
    assert events == [(registered_at, "active", "registration")]
    assert device == ("active", registered_at)


def test_generated_device_id_and_gateway_binding(cli: Cli) -> None:
    _create_acme(cli)
    gateway = cli("devices", "register", "--account", "acme", "--class", "gateway")
    assert gateway.code == 0, gateway.stderr
    gateway_id = gateway.json()["id"]  # type: ignore[index]
    bound = cli(
        "devices", "register", "--account", "acme", "--class", "wifi", "--gateway", str(gateway_id)
    )
    assert bound.code == 0, bound.stderr
    assert bound.json()["gateway_id"] == gateway_id  # type: ignore[index]
    assert "gateway" not in bound.json()  # type: ignore[operator]
    also = cli(
        "devices",
        "register",
        "--account",
        "acme",
        "--class",
        "wifi",
        "--gateway-id",
        str(gateway_id),
    )
    assert also.code == 0, also.stderr
    assert also.json()["gateway_id"] == gateway_id  # type: ignore[index]
    listed = cli("devices", "list", "--account", "acme").json()
    assert {d.get("gateway_id") for d in listed["devices"]} == {None, gateway_id}  # type: ignore[index]

    not_a_gateway = cli(
        "devices",
        "register",
        "--account",
        "acme",
        "--class",
        "wifi",
        "--gateway",
        str(bound.json()["id"]),
    )  # type: ignore[index]
    assert not_a_gateway.code == 2
    assert "not a gateway" in not_a_gateway.stderr


def test_set_state_records_events_and_is_idempotent(cli: Cli, database_url: str) -> None:
    _create_acme(cli)
    assert (
        cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1").code == 0
    )

    off = cli("devices", "set-state", "--device", "d1", "--state", "inactive")
    again = cli("devices", "set-state", "--device", "d1", "--state", "inactive")
    on = cli("devices", "set-state", "--device", "d1", "--state", "active")

    assert [off.code, again.code, on.code] == [0, 0, 0], off.stderr + again.stderr + on.stderr
    assert off.json()["state"] == "inactive"  # type: ignore[index]
    assert on.json()["state"] == "active"  # type: ignore[index]
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT state, source FROM device_state_events WHERE device_id = 'd1' ORDER BY time, id"
        ).fetchall()
    assert events == [
        ("active", "registration"),
        ("inactive", "cli"),  # the repeat changes nothing and records nothing
        ("active", "cli"),
    ]
    assert again.json() == off.json()  # type: ignore[union-attr]

    listed = cli("devices", "list", "--account", "acme")
    assert listed.code == 0
    devices = listed.json()["devices"]  # type: ignore[index]
    assert [(d["id"], d["state"]) for d in devices] == [("d1", "active")]
    assert all("key" not in d for d in devices), "a device key is shown only at registration"

    timeline = cli("devices", "events", "--device", "d1")
    states = [e["state"] for e in timeline.json()["events"]]  # type: ignore[index]
    assert states == ["active", "inactive", "active"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "accounts",
                "create",
                "--ref",
                "beta",
                "--name",
                "B",
                "--plan",
                "platinum",
                "--country",
                "JP",
            ],
            "unknown plan 'platinum'",
        ),
        (
            [
                "accounts",
                "create",
                "--ref",
                "beta",
                "--name",
                "B",
                "--plan",
                "standard",
                "--country",
                "JP",
                "--tz",
                "Asia/Tokio",
            ],
            "unknown time zone 'Asia/Tokio'",
        ),
        (
            [
                "accounts",
                "create",
                "--ref",
                "acme",
                "--name",
                "again",
                "--plan",
                "standard",
                "--country",
                "JP",
            ],
            "account 'acme' already exists",
        ),
        (
            [
                "accounts",
                "create",
                "--ref",
                "Bad Ref",
                "--name",
                "B",
                "--plan",
                "standard",
                "--country",
                "JP",
            ],
            "invalid account ref",
        ),
        (
            [
                "accounts",
                "create",
                "--ref",
                "beta",
                "--name",
                "B",
                "--plan",
                "standard",
                "--country",
                "ZZ",
            ],
            "no tax table for country 'ZZ'",
        ),
        (
            ["devices", "register", "--account", "nobody", "--class", "lte-m"],
            "unknown account 'nobody'",
        ),
        (
            ["devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1"],
            "device 'd1' already exists",
        ),
        (
            ["devices", "register", "--account", "acme", "--class", "satellite"],
            "no device class 'satellite'",
        ),
        (
            ["devices", "register", "--account", "acme", "--class", "lte-m", "--id", "a/b"],
            "invalid device id",
        ),
        (
            ["devices", "register", "--account", "acme", "--class", "lte-m", "--gateway", "g404"],
            "unknown device 'g404'",
        ),
        (
            ["devices", "set-state", "--device", "nope", "--state", "inactive"],
            "unknown device 'nope'",
        ),
        (["devices", "set-state", "--device", "d1", "--state", "asleep"], "asleep"),
        (["devices", "list", "--account", "nobody"], "unknown account 'nobody'"),
    ],
)
def test_refusals_are_one_line_exit_2_and_change_nothing(
    cli: Cli, database_url: str, args: list[str], message: str
) -> None:
    _create_acme(cli)
    assert (
        cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1").code == 0
    )
    before = _snapshot(database_url)

    result = cli(*args)

    assert result.code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _snapshot(database_url) == before


def test_no_command_deletes_a_device(cli: Cli, database_url: str, owner_database_url: str) -> None:
    help_text = cli("devices", "--help").stdout
    assert "delete" not in help_text.lower().replace("never deleted", "")
    _create_acme(cli)
    assert (
        cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1").code == 0
    )
    # The service role may not delete at all; the trigger refuses even the owner.
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("DELETE FROM devices WHERE id = 'd1'")
    with (
        psycopg.connect(owner_database_url) as conn,
        pytest.raises(psycopg.errors.RestrictViolation, match="never deleted"),
    ):
        conn.execute("DELETE FROM devices WHERE id = 'd1'")


def test_missing_database_url_is_a_clear_error(cli_env: dict[str, str], tmp_path: object) -> None:
    from pathlib import Path

    result = Cli(cli_env, Path(str(tmp_path)))("devices", "list", "--account", "acme")
    assert result.code == 1
    assert "DEVMETER_DATABASE_URL is not set" in result.stderr


def test_bad_catalog_is_refused_with_file_and_key(cli: Cli, tmp_path: object) -> None:
    from pathlib import Path

    bad = Path(str(tmp_path)) / "catalog.toml"
    bad.write_text(
        '[plans.x]\ncurrency = "JPY"\n[plans.x.classes.a]\nmode = "stepped"\n'
        'tiers = [{ price = "1" }]\n'
    )
    result = Cli({**cli.env, "DEVMETER_CATALOG": str(bad)}, cli.cwd)(
        "accounts", "create", "--ref", "b", "--name", "B", "--plan", "x", "--country", "JP"
    )
    assert result.code == 2
    assert str(bad) in result.stderr
    assert "plans.x.classes.a.mode" in result.stderr


def test_nul_characters_are_refused_not_a_server_error(database_url: str) -> None:
    from datetime import UTC, datetime

    from devmeter.db import connect
    from devmeter.errors import InvalidError, NotFoundError
    from metering.catalog import load_catalog
    from metering.registry import get_device, register_device, search_devices
    from tests.conftest import seed_fleet

    seed_fleet(database_url, [], datetime(2026, 10, 1, tzinfo=UTC))
    with connect(database_url) as conn:
        with pytest.raises(InvalidError, match="name must not contain NUL"):
            register_device(
                conn,
                load_catalog(),
                account_ref="acme",
                device_class="lte-m",
                at=datetime.now(UTC),
                name="a\x00b",
            )
        with pytest.raises(InvalidError, match="text must not contain NUL"):
            search_devices(conn, 1, text="\x00")
        with pytest.raises(NotFoundError):
            get_device(conn, "d\x00", 1)


def test_a_device_id_in_two_accounts_needs_its_account(cli: Cli) -> None:
    _create_acme(cli)
    other = cli(
        "accounts", "create", "--ref", "beta", "--name", "Beta", "--plan", "standard",
        "--country", "JP",
    )  # fmt: skip
    assert other.code == 0, other.stderr
    for ref in ("acme", "beta"):
        made = cli("devices", "register", "--account", ref, "--class", "lte-m", "--id", "pump-1")
        assert made.code == 0, made.stderr
        assert made.json()["mqtt"]["username"] == f"{ref}/pump-1"  # type: ignore[index]
    ambiguous = cli("devices", "set-state", "--device", "pump-1", "--state", "inactive")
    assert ambiguous.code == 2
    assert "more than one account" in ambiguous.stderr
    assert ambiguous.stderr.count("\n") == 1
    done = cli(
        "devices", "set-state", "--device", "pump-1", "--account", "beta", "--state", "inactive"
    )
    assert done.code == 0, done.stderr
    states = {
        ref: cli("devices", "list", "--account", ref).json()["devices"][0]["state"]  # type: ignore[index]
        for ref in ("acme", "beta")
    }
    assert states == {"acme": "active", "beta": "inactive"}
    rotated = cli("devices", "rotate-key", "--device", "pump-1", "--account", "acme")
    assert rotated.code == 0, rotated.stderr
    assert rotated.json()["key"].startswith("dmk_")  # type: ignore[index]
    assert "dmk_" not in rotated.stderr
    unknown = cli("devices", "rotate-key", "--device", "nope")
    assert unknown.code == 2
    assert "unknown device" in unknown.stderr
