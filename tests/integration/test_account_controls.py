"""Payment methods (SPEC A2), who reads usage (A1) and suspension (A3), through the API, the
CLI and the console against a real PostgreSQL. Every refusal names its field (API), is one
line with exit 2 (CLI), and leaves the tables exactly as they were."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from api.app import create_app
from devmeter.config import Settings
from devmeter.db import connect
from ingest.processor import Heartbeat, device_topic, process
from ingest.writer import load_directory, write_batch
from metering.statements import close_month
from tests.conftest import Cli, InProcessCli
from tests.integration.test_api import ADMIN, add_member, assert_problem, bearer, make_account
from tests.integration.test_close import CATALOG, NOW, jst, worked_example
from tests.integration.test_console import assert_page, browser, csrf_of, sign_in


@pytest.fixture
def cli(cli: Cli) -> Cli:
    """The `devmeter` entry point run in this process: these tests make many calls
    (tests/conftest.py, InProcessCli)."""
    return InProcessCli(cli.env, cli.cwd)


#: Every table a registration, activation, payment method or status change writes to.
TABLES = (
    "accounts",
    "devices",
    "device_state_events",
    "device_credentials",
    "idempotency_keys",
    "payment_methods",
    "account_status_changes",
)
PANS = (
    "4242424242424242",
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    "378282246310005",
    "pm_4242424242424242",
    "6011 0009 9013 9424 123",
)


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {
            table: conn.execute(
                sql.SQL("SELECT * FROM {} AS t ORDER BY t::text").format(sql.Identifier(table))
            ).fetchall()
            for table in TABLES
        }


def rows(url: str, query: LiteralString) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def client(database_url: str, mqtt_url: str, pro_catalog_path: Path) -> Iterator[TestClient]:
    """The API and console with the tests' catalog: the shipped plans and `pro`."""
    config = Settings(
        admin_token="op-token-for-tests",  # type: ignore[arg-type]
        env="test",
        catalog=pro_catalog_path,
    )
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url)
    with TestClient(app, follow_redirects=False) as c:
        yield c


@pytest.fixture
def pro_cli(cli: Cli, pro_catalog_path: Path) -> Cli:
    return Cli({**cli.env, "DEVMETER_CATALOG": str(pro_catalog_path)}, cli.cwd)


def make_us_account(client: TestClient, ref: str) -> str:
    r = client.post(
        "/v1/admin/accounts",
        json={"ref": ref, "name": ref, "plan": "standard", "country": "US"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["owner_key"])


# --- payment methods: API --------------------------------------------------------------------


def test_the_owner_sets_the_payment_method_managers_read_it_developers_do_not(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")

    body = assert_problem(client.get("/v1/payment-method", headers=bearer(owner)), 404)
    assert body["field"] == "payment_method"
    assert "PUT /v1/payment-method" in body["detail"]

    r = client.put(
        "/v1/payment-method", json={"kind": "card", "reference": "pm_1"}, headers=bearer(owner)
    )
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["account"], first["kind"], first["reference"], first["source"]) == (
        "acme",
        "card",
        "pm_1",
        "api",
    )
    for key in (owner, manager):
        assert client.get("/v1/payment-method", headers=bearer(key)).json() == first
    assert_problem(client.get("/v1/payment-method", headers=bearer(developer)), 403, "role")
    for key in (manager, developer):
        refused = client.put(
            "/v1/payment-method", json={"kind": "card", "reference": "pm_x"}, headers=bearer(key)
        )
        assert_problem(refused, 403, "role")

    # The same method again records nothing; another is appended, the first kept as history.
    again = client.put(
        "/v1/payment-method", json={"kind": "card", "reference": "pm_1"}, headers=bearer(owner)
    )
    assert again.json() == first
    replaced = client.put(
        "/v1/payment-method",
        json={"kind": "convenience_store", "reference": "konbini_cus_9"},
        headers=bearer(owner),
    ).json()
    assert replaced["kind"] == "convenience_store"
    assert client.get("/v1/payment-method", headers=bearer(manager)).json() == replaced
    invoice = client.put(
        "/v1/payment-method",
        json={"kind": "invoice", "reference": "inv-0042"},
        headers=bearer(owner),
    )
    assert invoice.status_code == 200, "invoice is fine in Japan"
    history = rows(
        database_url,
        "SELECT kind, reference, source, member_id IS NOT NULL FROM payment_methods ORDER BY id",
    )
    assert history == [
        ("card", "pm_1", "api", True),
        ("convenience_store", "konbini_cus_9", "api", True),
        ("invoice", "inv-0042", "api", True),
    ]
    # Another account sees none of it (A4).
    stranger = make_account(client, "beta")
    assert_problem(client.get("/v1/payment-method", headers=bearer(stranger)), 404)


def test_refused_payment_methods_change_nothing(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    us = make_us_account(client, "yankee")
    client.put(
        "/v1/payment-method", json={"kind": "card", "reference": "pm_1"}, headers=bearer(owner)
    )
    before = snapshot(database_url)

    for pan in PANS:
        r = client.put(
            "/v1/payment-method", json={"kind": "card", "reference": pan}, headers=bearer(owner)
        )
        body = assert_problem(r, 422, "reference")
        assert "card number" in body["detail"]
        assert pan not in r.text, "a card number is never echoed back"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (us, {"kind": "invoice", "reference": "inv-1"}, "kind"),
        (owner, {"kind": "konbini", "reference": "x"}, "kind"),
        (owner, {"kind": "paypal", "reference": "x"}, "kind"),
        (owner, {"kind": "card", "reference": ""}, "reference"),
        (owner, {"kind": "card", "reference": "has space"}, "reference"),
        (owner, {"kind": "card", "reference": "pm_\x00"}, "reference"),
        (owner, {"kind": "card"}, "reference"),
        (owner, {"kind": "card", "reference": "pm_2", "extra": 1}, "extra"),
    ]
    for key, body_in, field in cases:
        r = client.put("/v1/payment-method", json=body_in, headers=bearer(key))
        assert_problem(r, 422, field)
    invoice = client.put(
        "/v1/payment-method", json={"kind": "invoice", "reference": "inv-1"}, headers=bearer(us)
    )
    assert "only for accounts in Japan" in invoice.json()["detail"]
    assert snapshot(database_url) == before


# --- a plan that needs a payment method ----------------------------------------------------


def test_a_pro_account_registers_devices_once_a_payment_method_is_on_file(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme", plan="pro")
    _, _, developer = add_member(client, owner, "developer")
    before = snapshot(database_url)
    for headers in (bearer(developer), bearer(developer) | {"Idempotency-Key": "k1"}):
        r = client.post("/v1/devices", json={"class": "lte-m", "id": "d1"}, headers=headers)
        body = assert_problem(r, 409, "payment_method")
        assert body["detail"].startswith(
            "plan 'pro' needs a payment method on file before devices can be registered: "
            "the account owner sets one with PUT /v1/payment-method"
        )
    assert snapshot(database_url) == before

    assert client.put(
        "/v1/payment-method", json={"kind": "card", "reference": "pm_1"}, headers=bearer(owner)
    ).is_success
    r = client.post("/v1/devices", json={"class": "lte-m", "id": "d1"}, headers=bearer(developer))
    assert r.status_code == 201, r.text
    # A standard account (the shipped plans) needs none.
    standard = make_account(client, "beta")
    assert client.post("/v1/devices", json={"class": "lte-m"}, headers=bearer(standard)).is_success


def test_cli_payment_method_and_a_pro_account(pro_cli: Cli, database_url: str) -> None:
    cli = pro_cli
    for ref, plan, country in (("acme", "pro", "JP"), ("yankee", "pro", "US")):
        created = cli(
            "accounts", "create", "--ref", ref, "--name", ref, "--plan", plan, "--country", country
        )
        assert created.code == 0, created.stderr
    before = snapshot(database_url)
    refused = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
    assert refused.code == 2
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(
        "devmeter: error: plan 'pro' needs a payment method on file before devices can be "
        "registered"
    )
    assert "devmeter accounts set-payment-method" in refused.stderr
    for args, message in (
        (("acme", "card", "4242 4242 4242 4242"), "looks like a card number"),
        (("yankee", "invoice", "inv-1"), "only for accounts in Japan"),
        (("acme", "cheque", "x"), "'cheque' is not one of"),
        (("nope", "card", "pm_1"), "unknown account 'nope'"),
    ):
        account, kind, reference = args
        r = cli(
            "accounts", "set-payment-method",
            "--account", account, "--kind", kind, "--reference", reference,
        )  # fmt: skip
        assert r.code == 2, r
        assert message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert "4242" not in r.stderr
    assert snapshot(database_url) == before

    shown = cli("accounts", "show", "--account", "acme")
    assert shown.code == 0, shown.stderr
    assert shown.json()["payment_method"] is None  # type: ignore[index]
    r = cli(
        "accounts", "set-payment-method", "--account", "acme", "--kind", "invoice",
        "--reference", "inv-0042",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    out = r.json()
    assert isinstance(out, dict)
    assert (out["kind"], out["reference"], out["source"], out["changed"]) == (
        "invoice",
        "inv-0042",
        "cli",
        True,
    )
    again = cli(
        "accounts", "set-payment-method", "--account", "acme", "--kind", "invoice",
        "--reference", "inv-0042",
    )  # fmt: skip
    assert again.json()["changed"] is False  # type: ignore[index]
    shown_json = cli("accounts", "show", "--account", "acme").json()
    assert isinstance(shown_json, dict)
    assert shown_json["payment_method"]["reference"] == "inv-0042"
    assert shown_json["account"]["plan"] == "pro"
    assert rows(database_url, "SELECT member_id, source FROM payment_methods") == [(None, "cli")]
    registered = cli("devices", "register", "--account", "acme", "--class", "lte-m")
    assert registered.code == 0, registered.stderr


def test_import_into_a_pro_account_needs_a_payment_method(
    pro_cli: Cli, database_url: str, tmp_path: Path
) -> None:
    cli = pro_cli
    assert (
        cli(
            "accounts", "create", "--ref", "acme", "--name", "A", "--plan", "pro", "--country", "JP"
        ).code
        == 0
    )
    devices = tmp_path / "devices.csv"
    devices.write_text(
        "device_id,account,class,registered_at\nd1,acme,lte-m,2026-10-01T00:00:00Z\n",
        encoding="utf-8",
    )
    before = snapshot(database_url)
    refused = cli("import", "--devices", str(devices))
    assert refused.code == 2
    assert "needs a payment method on file" in refused.stderr
    assert snapshot(database_url) == before
    cli("accounts", "set-payment-method", "--account", "acme", "--kind", "card",
        "--reference", "pm_1")  # fmt: skip
    assert cli("import", "--devices", str(devices)).code == 0


# --- payment methods and roles: console ----------------------------------------------------


def test_console_account_page_and_payment_method_form(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme", plan="pro")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")

    dev = browser(client)
    dev_csrf = sign_in(dev, developer)
    devices = dev.get("/console/devices").text
    assert 'id="nav-account"' not in devices
    assert 'id="nav-usage"' not in devices, "usage is for managers and the owner (A1)"
    assert "managers and the owner" in assert_page(dev.get("/console/account"), 403)
    assert "managers and the owner" in assert_page(dev.get("/console/usage"), 403)
    form = assert_page(dev.get("/console/new-device"))
    assert 'id="payment-method-needed"' in form
    before = snapshot(database_url)
    refused = dev.post(
        "/console/devices", data={"csrf_token": dev_csrf, "class": "lte-m", "device_id": "d1"}
    )
    text = assert_page(refused, 409)
    assert "needs a payment method on file before devices can be registered" in text
    forged = dev.post(
        "/console/account/payment-method",
        data={"csrf_token": dev_csrf, "kind": "card", "reference": "pm_dev"},
    )
    assert "for the owner of" in assert_page(forged, 403)
    assert snapshot(database_url) == before

    mgr = browser(client)
    mgr_csrf = sign_in(mgr, manager)
    page = assert_page(mgr.get("/console/account"))
    assert 'id="nav-account"' in page
    assert 'id="owner-only"' in page
    assert 'id="payment-method-form"' not in page
    assert "None on file" in page
    assert_page(mgr.get("/console/usage"))
    assert_page(
        mgr.post(
            "/console/account/payment-method",
            data={"csrf_token": mgr_csrf, "kind": "card", "reference": "pm_mgr"},
        ),
        403,
    )

    csrf = sign_in(client, owner)
    page = assert_page(client.get("/console/account"))
    assert 'id="payment-method-form"' in page
    assert "needs a payment method on file" in page
    for data, field, message in (
        ({"kind": "card", "reference": "4242 4242 4242 4242"}, "reference", "card number"),
        ({"kind": "bitcoin", "reference": "x"}, "kind", "invalid payment method kind"),
        ({"kind": "card", "reference": ""}, "reference", "enter the payment"),
    ):
        r = client.post("/console/account/payment-method", data={"csrf_token": csrf, **data})
        text = assert_page(r, 422)
        assert message in text
        assert f'id="payment-{field}"' in text
        assert "4242" not in text, "a refused reference is not put back into the form"
    assert_page(
        client.post("/console/account/payment-method", data={"kind": "card", "reference": "pm_1"}),
        403,
    )
    assert snapshot(database_url) == before

    saved = client.post(
        "/console/account/payment-method",
        data={"csrf_token": csrf, "kind": "convenience_store", "reference": "konbini_1"},
    )
    assert saved.status_code == 303
    assert saved.headers["location"] == "/console/account?saved=1"
    page = assert_page(client.get(saved.headers["location"]))
    assert 'id="payment-method" data-kind="convenience_store"' in page
    assert "konbini_1" in page
    assert 'id="form-notice"' in page
    assert rows(database_url, "SELECT kind, source FROM payment_methods") == [
        ("convenience_store", "console")
    ]
    assert 'id="payment-method-needed"' not in dev.get("/console/new-device").text
    created = dev.post(
        "/console/devices", data={"csrf_token": dev_csrf, "class": "lte-m", "device_id": "d1"}
    )
    assert_page(created, 201)


# --- suspension: API ----------------------------------------------------------------------


def _suspend(client: TestClient, ref: str, **body: Any) -> Any:
    return client.post(f"/v1/admin/accounts/{ref}/suspend", json=body or None, headers=ADMIN)


def test_a_suspended_account_cannot_register_or_activate(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)
    for device in ("on", "off"):
        r = client.post("/v1/devices", json={"class": "lte-m", "id": device}, headers=h)
        assert r.status_code == 201, r.text
    client.post("/v1/devices/off/deactivate", headers=h)

    assert_problem(client.post("/v1/admin/accounts/acme/suspend"), 401)
    assert_problem(client.post("/v1/admin/accounts/acme/suspend", headers=h), 401)
    assert_problem(_suspend(client, "nope"), 404, "account")
    r = _suspend(client, "acme", reason="payment not confirmed")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["account"], out["status"], out["changed"], out["reason"]) == (
        "acme",
        "suspended",
        True,
        "payment not confirmed",
    )
    # Idempotent: 200 again, nothing more recorded, the first suspension's reason kept.
    again = _suspend(client, "acme", reason="second try")
    assert again.status_code == 200
    assert again.json() == out | {"changed": False}
    assert rows(database_url, "SELECT count(*) FROM account_status_changes") == [(1,)]

    before = snapshot(database_url)
    for refused in (
        client.post("/v1/devices", json={"class": "lte-m", "id": "new"}, headers=h),
        client.post("/v1/devices/off/activate", headers=h),
    ):
        body = assert_problem(refused, 403, "account")
        assert "account 'acme' is suspended" in body["detail"]
    assert snapshot(database_url) == before
    # Deactivating lowers what the account is charged: allowed while suspended.
    off = client.post("/v1/devices/on/deactivate", headers=h)
    assert off.status_code == 200
    assert off.json()["state"] == "inactive"
    # Reading goes on as before.
    assert client.get("/v1/devices", headers=h).status_code == 200
    listed = client.get("/v1/admin/accounts", headers=ADMIN).json()
    assert [a["status"] for a in listed] == ["suspended"]

    resumed = client.post("/v1/admin/accounts/acme/resume", headers=ADMIN)
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["status"], resumed.json()["changed"], resumed.json()["reason"]) == (
        "active",
        True,
        None,
    )
    assert client.post("/v1/admin/accounts/acme/resume", headers=ADMIN).json()["changed"] is False
    assert client.post("/v1/devices/off/activate", headers=h).status_code == 200
    assert client.post("/v1/devices", json={"class": "lte-m"}, headers=h).status_code == 201
    assert rows(
        database_url, "SELECT status, reason, source FROM account_status_changes ORDER BY id"
    ) == [("suspended", "payment not confirmed", "api"), ("active", None, "api")]
    assert_problem(_suspend(client, "acme", reason="x" * 501), 422, "reason")
    assert_problem(_suspend(client, "acme", bogus=1), 422, "bogus")


def test_a_suspended_accounts_heartbeats_are_stored_and_its_month_closes(
    database_url: str,
) -> None:
    """A3: suspension refuses registration and activation only. The ingest path (processor,
    directory, writer) and the month close never look at the status."""
    from metering.accounts import set_account_status

    worked_example(database_url)
    with connect(database_url) as conn, conn.transaction():
        result = set_account_status(
            conn, account_ref="acme", status="suspended", at=NOW, source="cli", reason="unpaid"
        )
    assert result.changed

    received = jst(2026, 10, 26, 9)
    with connect(database_url) as conn:
        directory = load_directory(conn)
        conn.commit()
        beats: list[Heartbeat] = []
        for device, state, seq in (("acme-d1", "active", 1), ("acme-d6", "inactive", 1)):
            payload = json.dumps(
                {"state": state, "ts": received.astimezone(UTC).isoformat(), "seq": seq}
            ).encode()
            out = process(device_topic("acme", device), payload, received, directory)
            assert isinstance(out, list), out
            beats += out
        written = write_batch(conn, beats, [])
    assert written.heartbeats == 2
    assert rows(database_url, "SELECT device_id, state FROM heartbeats ORDER BY device_id") == [
        ("acme-d1", "active"),
        ("acme-d6", "inactive"),
    ]

    report = close_month(lambda: connect(database_url), CATALOG, "2026-10", now=NOW)
    assert report.closed == ["acme"], report
    assert rows(database_url, "SELECT month::text, subtotal::text FROM statements") == [
        ("2026-10-01", "3500")
    ]
    assert rows(database_url, "SELECT status FROM accounts") == [("suspended",)]


# --- suspension: CLI and console ---------------------------------------------------------


def test_cli_suspend_and_resume(cli: Cli, database_url: str) -> None:
    assert cli(
        "accounts", "create", "--ref", "acme", "--name", "A", "--plan", "standard",
        "--country", "JP",
    ).code == 0  # fmt: skip
    assert (
        cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1").code == 0
    )
    assert cli("devices", "set-state", "--device", "d1", "--state", "inactive").code == 0

    r = cli("accounts", "suspend", "--account", "acme", "--reason", "payment not confirmed")
    assert r.code == 0, r.stderr
    out = r.json()
    assert isinstance(out, dict)
    assert (out["status"], out["changed"], out["reason"]) == (
        "suspended",
        True,
        "payment not confirmed",
    )
    assert out["changed_at"].endswith("Z")
    again = cli("accounts", "suspend", "--account", "acme")
    assert (again.code, again.json()["changed"]) == (0, False)  # type: ignore[index]

    before = snapshot(database_url)
    for args, message in (
        (("devices", "register", "--account", "acme", "--class", "lte-m"), "cannot be registered"),
        (("devices", "set-state", "--device", "d1", "--state", "active"), "cannot be activated"),
        (("accounts", "suspend", "--account", "nope"), "unknown account 'nope'"),
    ):
        refused = cli(*args)
        assert refused.code == 2, refused
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert message in refused.stderr
    assert snapshot(database_url) == before

    shown = cli("accounts", "show", "--account", "acme").json()
    assert isinstance(shown, dict)
    assert shown["account"]["status"] == "suspended"
    assert [c["reason"] for c in shown["status_changes"]] == ["payment not confirmed"]
    resumed = cli("accounts", "resume", "--account", "acme", "--reason", "paid")
    assert (resumed.code, resumed.json()["status"]) == (0, "active")  # type: ignore[index]
    assert cli("devices", "set-state", "--device", "d1", "--state", "active").code == 0
    assert rows(
        database_url, "SELECT status, reason, source FROM account_status_changes ORDER BY id"
    ) == [("suspended", "payment not confirmed", "cli"), ("active", "paid", "cli")]


def test_console_of_a_suspended_account_says_why(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)
    client.post("/v1/devices", json={"class": "lte-m", "id": "off"}, headers=h)
    client.post("/v1/devices/off/deactivate", headers=h)
    csrf = sign_in(client, owner)
    assert 'id="suspended-banner"' not in client.get("/console/devices").text
    assert _suspend(client, "acme").status_code == 200

    page = assert_page(client.get("/console/devices"))
    assert 'id="suspended-banner"' in page
    assert 'data-status="suspended"' in assert_page(client.get("/console/account"))
    before = snapshot(database_url)
    registered = client.post(
        "/console/devices", data={"csrf_token": csrf, "class": "lte-m", "device_id": "new"}
    )
    assert "is suspended: devices cannot be registered" in assert_page(registered, 403)
    activated = client.post("/console/devices/off/activate", data={"csrf_token": csrf})
    assert "is suspended: devices cannot be activated" in assert_page(activated, 403)
    fragment = client.post(
        "/console/devices/off/activate",
        headers={"X-Console-Fragment": "row", "X-CSRF-Token": csrf_of(page)},
    )
    assert fragment.status_code == 403
    assert "cannot be activated" in fragment.text
    assert snapshot(database_url) == before


def test_the_histories_are_append_only_even_for_the_owner(
    cli: Cli, owner_database_url: str
) -> None:
    assert cli(
        "accounts", "create", "--ref", "acme", "--name", "A", "--plan", "standard",
        "--country", "JP",
    ).code == 0  # fmt: skip
    assert cli("accounts", "suspend", "--account", "acme").code == 0
    assert cli(
        "accounts", "set-payment-method", "--account", "acme", "--kind", "card",
        "--reference", "pm_1",
    ).code == 0  # fmt: skip
    statements: list[LiteralString] = [
        "UPDATE payment_methods SET reference = 'pm_2'",
        "DELETE FROM payment_methods",
        "TRUNCATE payment_methods",
        "UPDATE account_status_changes SET reason = 'rewritten'",
        "DELETE FROM account_status_changes",
        "TRUNCATE account_status_changes",
    ]
    for statement in statements:
        with (
            psycopg.connect(owner_database_url) as conn,
            pytest.raises(psycopg.errors.RestrictViolation, match="never change"),
        ):
            conn.execute(statement)
    assert rows(owner_database_url, "SELECT count(*) FROM payment_methods") == [(1,)]
    assert rows(owner_database_url, "SELECT count(*) FROM account_status_changes") == [(1,)]
