"""The contract endpoints (issue 12): the owner asks (and may ask the cost first), managers
read, developers do not; the operator issues charges; refusals name the field, change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from devmeter.config import Settings
from devmeter.db import connect
from tests.integration.test_api import ADMIN, add_member, assert_problem, bearer, make_account
from tests.integration.test_contracts_cli import CATALOG

TABLES = ("contracts", "contract_changes", "charges", "plan_changes")


@pytest.fixture
def client(database_url: str, mqtt_url: str, tmp_path: Path) -> Iterator[TestClient]:
    path = tmp_path / "contracts.toml"
    path.write_text(CATALOG, encoding="utf-8")
    config = Settings(admin_token="op-token-for-tests", env="test", catalog=path)  # type: ignore[arg-type]
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url, console=False)
    with TestClient(app) as c:
        yield c


def snapshot(url: str) -> dict[str, list[Any]]:
    with connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}


def test_the_owner_asks_managers_read_developers_do_not(client: TestClient) -> None:
    owner = make_account(client, "acme", plan="cal")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")
    assert client.get("/v1/contract", headers=bearer(owner)).json()["status"] == "none"
    r = client.post(
        "/v1/contract",
        json={"term": "annual", "commitments": {"lte-m": 10}, "at": "2017-09-15T10:00:00+09:00"},
        headers=bearer(owner),
    )
    assert r.status_code == 201, r.text
    assert r.json()["request"]["kind"] == "start"
    seen = client.get(
        "/v1/contract", params={"at": "2018-03-20T00:00:00+09:00"}, headers=bearer(manager)
    ).json()
    assert (seen["status"], seen["term_start"], seen["term_end"]) == (
        "active",
        "2017-10-01",
        "2018-09-30",
    )
    assert (seen["renews_at"], seen["cancellation_deadline"]) == (
        "2018-10-01T00:00:00+09:00",
        "2018-09-20",
    )
    # What the increase would cost, before making it.
    change = {"commitments": {"lte-m": 20}, "at": "2018-03-20T10:00:00+09:00"}
    quote = client.post(
        "/v1/contract/change", json={**change, "dry_run": True}, headers=bearer(owner)
    )
    assert quote.status_code == 200, quote.text
    [charge] = quote.json()["charges"]
    assert (charge["kind"], charge["amount"], charge["issued_on"], charge["due_date"]) == (
        "proration",
        "4800",
        "2018-04-01",
        "2018-05-31",
    )
    for key in (manager, developer):
        assert_problem(client.post("/v1/contract/change", json=change, headers=bearer(key)), 403)
    assert_problem(client.get("/v1/contract", headers=bearer(developer)), 403, "role")
    assert_problem(client.get("/v1/charges", headers=bearer(developer)), 403, "role")
    done = client.post("/v1/contract/change", json=change, headers=bearer(owner)).json()
    assert done["changed"] is True
    r = client.post(
        "/v1/admin/charges/issue",
        json={"until": "2018-04-01T00:00:00+09:00", "account": "acme"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    # The term's fee was issued with the change (each request issues what is due by then).
    assert [c["kind"] for c in r.json()["issued"]] == ["proration"]
    charges = client.get("/v1/charges", headers=bearer(manager)).json()["charges"]
    assert [(c["kind"], c["amount"]) for c in charges] == [
        ("term_fee", "22000"),
        ("proration", "4800"),
    ]
    assert client.get("/v1/admin/accounts/acme/charges", headers=ADMIN).json()["charges"] == (
        charges
    )
    cancelled = client.post(
        "/v1/contract/cancel",
        json={"end_after": "2018-12", "at": "2018-04-02T00:00:00+09:00"},
        headers=bearer(owner),
    ).json()
    assert cancelled["contract"]["ends_at"] == "2019-01-01T00:00:00+09:00"
    assert client.post(
        "/v1/contract/switch-term", json={"term": "monthly", "at": "2018-04-03T00:00:00+09:00"},
        headers=bearer(owner),
    ).status_code == 409  # fmt: skip


def test_refusals_name_the_field_and_change_nothing(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme", plan="cal")
    h = bearer(owner)
    assert_problem(client.post("/v1/contract/cancel", json={}, headers=h), 404, "contract")
    at = "2018-08-10T00:00:00+09:00"
    for body, status, field in [
        ({"term": "weekly", "at": at}, 422, "term"),
        ({"term": "monthly", "commitments": {"wifi": 1}, "at": at}, 422, "commit"),
        ({"term": "monthly", "commitments": {"lte-m": -1}, "at": at}, 422, None),
        ({"term": "monthly", "at": "2999-01-01T00:00:00Z"}, 422, "at"),
        ({"term": "monthly", "at": "1969-12-31T00:00:00Z"}, 422, "at"),
    ]:
        assert_problem(client.post("/v1/contract", json=body, headers=h), status, field)
    assert snapshot(database_url)["contracts"] == []
    assert (
        client.post("/v1/contract", json={"term": "monthly", "at": at}, headers=h).status_code
        == 201
    )
    before = snapshot(database_url)
    for path, body, status, field in [
        ("/v1/contract", {"term": "monthly", "at": at}, 409, "contract"),
        ("/v1/contract/change", {"at": at}, 422, "plan"),
        ("/v1/contract/change", {"plan": "ann", "at": at}, 422, "plan"),
        ("/v1/contract/change", {"plan": "nope", "at": at}, 422, "plan"),
        ("/v1/contract/cancel", {"end_after": "2018-07", "at": at}, 422, "end_after"),
        ("/v1/contract/cancel", {"end_after": "2018-7", "at": at}, 422, None),
        ("/v1/contract/switch-term", {"term": "annual", "at": "2018-08-09T00:00:00Z"}, 409, "at"),
    ]:
        assert_problem(client.post(path, json=body, headers=h), status, field)
    assert snapshot(database_url) == before
