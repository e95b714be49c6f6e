"""The plan and credit endpoints (issue 10): who may do what, and refusals that change nothing."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from devmeter.db import connect
from tests.conftest import Cli
from tests.integration.test_api import ADMIN, add_member, assert_problem, bearer, make_account
from tests.integration.test_api import client as client

TABLES = ("accounts", "plan_changes", "credit_ledger")


def snapshot(url: str) -> dict[str, list[Any]]:
    with connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}


def test_the_owner_changes_the_plan_managers_read_it_developers_do_not(
    client: TestClient,
) -> None:
    owner = make_account(client, "acme")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")
    r = client.put("/v1/plan", json={"plan": "standard-volume"}, headers=bearer(owner))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["plan"], body["previous_plan"], body["changed"]) == (
        "standard-volume",
        "standard",
        True,
    )
    assert [h["plan"] for h in body["history"]] == ["standard", "standard-volume"]
    assert body["history"][0]["changed_by"] == "sign-up"
    seen = client.get("/v1/plan", headers=bearer(manager)).json()
    assert seen["history"] == body["history"]
    assert_problem(client.put("/v1/plan", json={"plan": "standard"}, headers=bearer(manager)), 403)
    for path in ("/v1/plan", "/v1/credits"):
        assert_problem(client.get(path, headers=bearer(developer)), 403, "role")
    # The usage of the month shows which plan prices it: the sign-up plan this month.
    usage = client.get("/v1/usage", headers=bearer(owner)).json()
    assert usage["plan"] in ("standard", "standard-volume")


def test_operator_grants_and_the_owner_reads_the_balance(client: TestClient) -> None:
    owner = make_account(client, "acme")
    r = client.post(
        "/v1/admin/accounts/acme/credits",
        json={"points": 1000, "reason": "welcome", "expires": "2027-03-31"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    assert r.json()["granted"]["remaining"] == "1000"
    balance = client.get("/v1/credits", headers=bearer(owner)).json()
    assert (balance["balance"], balance["balance_amount"], balance["currency"]) == (
        "1000",
        "1000",
        "JPY",
    )
    assert [(e["kind"], e["points"], e["expires_on"]) for e in balance["ledger"]] == [
        ("grant", "1000", "2027-03-31")
    ]
    assert client.get("/v1/admin/accounts/acme/credits", headers=ADMIN).json() == balance
    # Owners do not grant themselves points.
    assert (
        client.post(
            "/v1/admin/accounts/acme/credits", json={"points": 5}, headers=bearer(owner)
        ).status_code
        == 401
    )


def test_refusals_name_the_field_and_change_nothing(
    client: TestClient, database_url: str, cli: Cli
) -> None:
    owner = make_account(client, "acme")
    before = snapshot(database_url)
    for method, path, body, headers, status, field in [
        ("post", "/v1/admin/accounts/acme/credits", {"points": 0}, ADMIN, 422, "points"),
        ("post", "/v1/admin/accounts/acme/credits", {"points": -5}, ADMIN, 422, "points"),
        ("post", "/v1/admin/accounts/acme/credits", {"points": "ten"}, ADMIN, 422, "points"),
        (
            "post",
            "/v1/admin/accounts/acme/credits",
            {"points": 5, "at": "2099-01-01T00:00:00Z"},
            ADMIN,
            422,
            "at",
        ),
        (
            "post",
            "/v1/admin/accounts/acme/credits",
            {"points": 5, "at": "2026-10-05T00:00:00+09:00", "expires": "2026-10-01"},
            ADMIN,
            422,
            "expires",
        ),
        ("post", "/v1/admin/accounts/nobody/credits", {"points": 5}, ADMIN, 404, "account"),
        ("put", "/v1/plan", {"plan": "gold"}, bearer(owner), 422, "plan"),
        (
            "put",
            "/v1/plan",
            {"plan": "standard-volume", "at": "2099-01-01T00:00:00Z"},
            bearer(owner),
            422,
            "at",
        ),
        (
            "put",
            "/v1/plan",
            {"plan": "standard-volume", "at": "2000-01-01T00:00:00Z"},
            bearer(owner),
            409,
            "at",
        ),
        ("post", "/v1/admin/accounts/acme/plan", {"plan": "nope"}, ADMIN, 422, "plan"),
    ]:
        r = getattr(client, method)(path, json=body, headers=headers)
        assert_problem(r, status, field)
    for args, message in [
        (("credits", "grant", "--account", "acme", "--points", "0"), "points"),
        (("credits", "grant", "--account", "nobody", "--points", "5"), "unknown account"),
        (
            ("credits", "grant", "--account", "acme", "--points", "5", "--at", "2099-01-01"),
            "future",
        ),
        (("credits", "balance", "--account", "nobody"), "unknown account"),
        (("accounts", "set-plan", "--account", "acme", "--plan", "gold"), "unknown plan"),
        (
            ("accounts", "set-plan", "--account", "acme", "--plan", "starter", "--at", "x"),
            "--at",
        ),
    ]:
        result = cli(*args)
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(database_url) == before
