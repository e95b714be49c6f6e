"""Device keys as NATS reads them (migration 0017): a bcrypt hash beside the Mosquitto one,
written by every path that makes a key, and what becomes of devices registered before it."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from pathlib import Path

import bcrypt
import pytest

from devmeter.db import connect
from devmeter.migrate import migrate
from ingest.nats_auth import NatsCredentialSync
from metering import registry
from metering.catalog import load_catalog
from metering.importer import import_history
from metering.registry import create_account, register_device, rotate_device_key
from metering.secrets import NATS_BCRYPT_COST, nats_hash
from tests.conftest import SERVICE_PASSWORD, Cli, seed_fleet

#: What releases before migration 0017 wrote at registration and rotation (metering/queries.sql
#: as it was): the Mosquitto hash alone.
PRE_0017_UPSERT = """
INSERT INTO device_credentials (account_id, device_id, broker_hash, key_issued_at)
VALUES (%(account_id)s, %(id)s, %(broker_hash)s, %(at)s)
ON CONFLICT (account_id, device_id)
DO UPDATE SET broker_hash = EXCLUDED.broker_hash, key_issued_at = EXCLUDED.key_issued_at,
              written_xact = pg_current_xact_id()
"""


def nats_row(url: str, username: str) -> dict[str, object] | None:
    with connect(url) as conn:
        return conn.execute(
            "SELECT n.password_hash AS nats, m.password_hash AS mqtt, n.written_xact::text AS x"
            " FROM nats_device_credentials n JOIN mqtt_device_credentials m USING (username)"
            " WHERE username = %s",
            (username,),
        ).fetchone()


def checks(stored: object, key: str) -> bool:
    return bcrypt.checkpw(key.encode(), str(stored).encode())


def test_the_hash_is_bcrypt_at_the_chosen_cost_and_checks_the_key() -> None:
    hashed = nats_hash("dmk_" + "x" * 43)
    assert hashed.startswith(f"$2a${NATS_BCRYPT_COST:02d}$")
    assert len(hashed) == 60
    assert checks(hashed, "dmk_" + "x" * 43)
    assert not checks(hashed, "dmk_" + "x" * 42 + "y")
    with pytest.raises(ValueError, match="72 bytes"):
        nats_hash("k" * 73)


def test_registration_and_rotation_store_both_hashes_in_one_transaction(
    database_url: str,
) -> None:
    seed_fleet(database_url, [], datetime.now(UTC))
    with connect(database_url) as conn, conn.transaction():
        key = register_device(
            conn, load_catalog(), account_ref="acme", device_class="lte-m", device_id="d1",
            at=datetime.now(UTC),
        ).key  # fmt: skip
    row = nats_row(database_url, "acme/d1")
    assert row is not None
    assert str(row["mqtt"]).startswith("$7$")
    assert checks(row["nats"], key)

    with connect(database_url) as conn, conn.transaction():
        new = rotate_device_key(conn, device_id="d1", at=datetime.now(UTC)).key
    rotated = nats_row(database_url, "acme/d1")
    assert rotated is not None
    assert checks(rotated["nats"], new)
    assert not checks(rotated["nats"], key)
    assert rotated["mqtt"] != row["mqtt"]
    assert rotated["x"] != row["x"], "the row is rewritten, so an incremental sync reads it"


def test_the_cli_registers_and_rotates_with_a_nats_hash(cli: Cli, owner_database_url: str) -> None:
    made = cli(
        "accounts", "create", "--ref", "acme", "--name", "ACME", "--plan", "standard",
        "--country", "JP",
    )  # fmt: skip
    assert made.code == 0, made.stderr
    registered = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
    assert registered.code == 0, registered.stderr
    key = registered.json()["key"]  # type: ignore[index]
    row = nats_row(owner_database_url, "acme/d1")
    assert row is not None
    assert checks(row["nats"], key)
    rotated = cli("devices", "rotate-key", "--device", "d1")
    assert rotated.code == 0, rotated.stderr
    row = nats_row(owner_database_url, "acme/d1")
    assert row is not None
    assert checks(row["nats"], rotated.json()["key"])  # type: ignore[index]
    assert not checks(row["nats"], key)


def test_imported_devices_get_their_hashes_when_their_key_is_issued(
    database_url: str, tmp_path: Path
) -> None:
    """The importer shows no key and stores no credential (neither broker admits the device);
    the key the operator issues later (rotate-key) gets both hashes."""
    seed_fleet(database_url, [], datetime(2026, 9, 1, tzinfo=UTC))
    devices = tmp_path / "devices.csv"
    devices.write_text("device_id,account,class,registered_at\nimp1,acme,lte-m,2026-09-02T00:00Z\n")
    with connect(database_url) as conn, conn.transaction():
        import_history(conn, load_catalog(), devices=devices)
    assert nats_row(database_url, "acme/imp1") is None
    with connect(database_url) as conn, conn.transaction():
        key = rotate_device_key(conn, device_id="imp1", at=datetime.now(UTC)).key
    row = nats_row(database_url, "acme/imp1")
    assert row is not None
    assert checks(row["nats"], key)


def test_a_device_registered_before_0017_waits_for_a_rotation_to_reach_nats(
    empty_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The database as a release before 0017 left it (0016 is another change's: included once
    # it exists), with a device that release registered.
    migrate(empty_database_url, service_password=SERVICE_PASSWORD, target=16)
    catalog = load_catalog()
    with monkeypatch.context() as old_release, connect(empty_database_url) as conn:
        old_release.setitem(registry.Q, "upsert_device_credential", PRE_0017_UPSERT)
        create_account(
            conn, catalog, ref="acme", name="ACME", plan="standard", country="JP",
            timezone="Asia/Tokyo", signed_up_on=date(2026, 1, 1),
        )  # fmt: skip
        old_key = register_device(
            conn, catalog, account_ref="acme", device_class="lte-m", device_id="old",
            at=datetime.now(UTC),
        ).key  # fmt: skip
        conn.commit()
    migrate(empty_database_url, service_password=SERVICE_PASSWORD)
    with connect(empty_database_url) as conn, conn.transaction():
        register_device(
            conn, catalog, account_ref="acme", device_class="lte-m", device_id="new",
            at=datetime.now(UTC),
        )  # fmt: skip
    row = nats_row(empty_database_url, "acme/old")
    assert row is not None
    assert row["nats"] is None
    assert str(row["mqtt"]).startswith("$7$"), "it keeps its Mosquitto credential"

    sync = NatsCredentialSync(
        empty_database_url, tmp_path / "nats", reload=lambda: None, ingest_password="ingest-pw"
    )
    with caplog.at_level(logging.INFO, logger="devmeter.broker"):
        assert sync.write()
    text = sync.auth_file.read_text()
    assert '"acme/new"' in text
    assert '"acme/old"' not in text
    assert sync.unhashed == 1
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 devices have no bcrypt hash" in said
    assert old_key not in said
    assert old_key not in text

    # Rotated: admitted at NATS from the next (incremental) sync on.
    caplog.clear()
    with connect(empty_database_url) as conn, conn.transaction():
        new_key = rotate_device_key(conn, device_id="old", at=datetime.now(UTC)).key
    with caplog.at_level(logging.INFO, logger="devmeter.broker"):
        assert sync.write(full=False)
    assert '"acme/old"' in sync.auth_file.read_text()
    assert sync.unhashed == 0
    assert "every device has a bcrypt hash" in caplog.text
    assert new_key not in caplog.text


def test_a_rotation_without_a_bcrypt_hash_drops_the_old_one(database_url: str) -> None:
    """A release before 0017, still running during an upgrade, rotates a key: the bcrypt hash
    of the old key must not stay valid at NATS."""
    seed_fleet(database_url, [("d1", "lte-m", None)], datetime.now(UTC))
    before = nats_row(database_url, "acme/d1")
    assert before is not None
    assert before["nats"] is not None
    with connect(database_url) as conn, conn.transaction():
        account = conn.execute("SELECT id FROM accounts WHERE ref = 'acme'").fetchone()
        assert account is not None
        conn.execute(
            PRE_0017_UPSERT,  # type: ignore[arg-type]
            {"account_id": account["id"], "id": "d1", "broker_hash": str(before["mqtt"]) + "=",
             "at": datetime.now(UTC)},
        )  # fmt: skip
    after = nats_row(database_url, "acme/d1")
    assert after is not None
    assert after["nats"] is None


def test_up_with_jetstream_keeps_the_nats_file_current(database_url: str, tmp_path: Path) -> None:
    """What `devmeter up` starts when DEVMETER_INGEST_SOURCE=jetstream and the file is set."""
    import threading
    from contextlib import ExitStack

    from devmeter.config import Settings
    from devmeter.service import _start_nats_credentials
    from tests.integration.test_ingest_worker import poll

    auth_file = tmp_path / "nats" / "devmeter-auth.conf"
    config = Settings(
        ingest_source="jetstream",
        nats_url="nats://devmeter-ingest:ingest-pw@127.0.0.1:1",
        nats_auth_file=auth_file,
    )
    seed_fleet(database_url, [("d1", "lte-m", None)], datetime.now(UTC))
    stop = threading.Event()
    with ExitStack() as stack:
        _start_nats_credentials(config, database_url, stop, stack)
        stack.callback(stop.set)  # last in, first out: the sync is told to stop, then joined
        assert '"acme/d1"' in auth_file.read_text()
        with connect(database_url) as conn, conn.transaction():
            register_device(
                conn, load_catalog(), account_ref="acme", device_class="lte-m", device_id="d2",
                at=datetime.now(UTC),
            )  # fmt: skip
        poll(lambda: '"acme/d2"' in auth_file.read_text(), 10, "the registration in the file")
