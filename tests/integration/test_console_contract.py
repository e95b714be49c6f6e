"""The console's contract page (issue 12): owner and managers see the contract, its next
renewal and cancellation deadline and the charges; the owner sees what a change would cost
before making it, and nothing changes until it is confirmed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from devmeter.config import Settings
from devmeter.db import connect
from tests.integration.test_api import ADMIN, add_member, bearer, make_account
from tests.integration.test_console import assert_page, browser, csrf_of, sign_in
from tests.integration.test_contracts_cli import CATALOG


@pytest.fixture
def client(database_url: str, mqtt_url: str, tmp_path: Path) -> Iterator[TestClient]:
    path = tmp_path / "contracts.toml"
    path.write_text(CATALOG, encoding="utf-8")
    config = Settings(admin_token="op-token-for-tests", env="test", catalog=path)  # type: ignore[arg-type]
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def requests_made(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM contract_changes").fetchone()
    assert row is not None
    return int(row["n"])


def test_the_owner_sees_the_contract_and_the_cost_of_a_change_first(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme", plan="ann")
    _, _, manager = add_member(client, owner, "manager")
    csrf = sign_in(client, owner)
    page = assert_page(client.get("/console/contract"))
    assert 'id="no-contract"' in page
    r = client.post("/v1/contract", json={"term": "monthly"}, headers=bearer(owner))
    assert r.status_code == 201, r.text
    contract = client.get("/v1/contract", headers=bearer(owner)).json()
    page = assert_page(client.get("/console/contract"))
    assert 'data-status="active"' in page
    renews = re.search(r'id="contract-renews">([0-9-]{10})', page)
    assert renews is not None
    assert renews.group(1) == contract["renews_at"][:10]
    assert str(contract["cancellation_deadline"]) in page
    assert page.count('data-testid="charge"') == 1

    # The upgrade, previewed: its pro rata charge is shown, nothing is recorded.
    before = requests_made(database_url)
    preview = client.post(
        "/console/contract/change",
        data={"csrf_token": csrf, "plan": "ann-pro", "commit-lte-m": "0"},
    )
    text = assert_page(preview)
    assert 'data-testid="quote-charge" data-kind="proration"' in text
    assert requests_made(database_url) == before
    confirm = client.post(
        "/console/contract/change",
        data={
            "csrf_token": csrf_of(text),
            "plan": "ann-pro",
            "commit-lte-m": "0",
            "action": "confirm",
        },
    )
    assert confirm.status_code == 303, confirm.text
    assert confirm.headers["location"] == "/console/contract?done=change"
    assert requests_made(database_url) == before + 1
    page = assert_page(client.get("/console/contract?done=change"))
    assert "The change is recorded." in page
    assert page.count('data-testid="charge"') == 2

    # A refusal is shown on the page, nothing changed.
    refused = client.post(
        "/console/contract/cancel", data={"csrf_token": csrf, "end_after": "1999-01"}
    )
    assert 'id="form-error"' in assert_page(refused, 422)
    assert requests_made(database_url) == before + 1

    # Managers read it, without the forms; their posts are refused.
    other = browser(client)
    manager_csrf = sign_in(other, manager)
    page = assert_page(other.get("/console/contract"))
    assert 'id="contract-owner-only"' in page
    assert 'id="change-form"' not in page
    r = other.post("/console/contract/cancel", data={"csrf_token": manager_csrf})
    assert r.status_code == 403
    assert requests_made(database_url) == before + 1
    # The operator's view agrees.
    assert client.get("/v1/admin/accounts/acme/contract", headers=ADMIN).json()["plan"] == "ann-pro"


def test_the_tier_what_if_prices_what_lies_above_the_commitment(client: TestClient) -> None:
    """Under a contract the committed devices are billed with the term: the usage page's
    what-if shows next month's price as the devices above them."""
    owner = make_account(client, "acme", plan="ann")
    for n in range(5):
        r = client.post(
            "/v1/devices", json={"class": "lte-m", "id": f"d{n}"}, headers=bearer(owner)
        )
        assert r.status_code == 201, r.text
    sign_in(client, owner)
    page = assert_page(client.get("/console/usage"))
    assert 'data-testid="committed"' not in page
    assert "¥500" in page  # 5 x 100, no contract
    r = client.post(
        "/v1/contract",
        json={"term": "monthly", "commitments": {"lte-m": 3}},
        headers=bearer(owner),
    )
    assert r.status_code == 201, r.text
    page = assert_page(client.get("/console/usage"))
    assert 'data-testid="committed" data-value="3"' in page
    row = page[page.index('data-testid="what-if-row"') :]
    assert "¥200" in row[: row.index("</tr>")]  # (5 - 3) x 100
