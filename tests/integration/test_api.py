"""The REST API against a real PostgreSQL: every endpoint, error code, role and tenant boundary."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from devmeter.config import Settings
from devmeter.db import connect
from ingest.processor import Heartbeat
from ingest.writer import write_batch
from metering.access import issue_key
from tests.integration.test_close import worked_example

ADMIN = {"Authorization": "Bearer op-token-for-tests"}


@pytest.fixture
def client(database_url: str, mqtt_url: str) -> Iterator[TestClient]:
    config = Settings(admin_token="op-token-for-tests", env="test")  # type: ignore[arg-type]
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url, console=False)
    with TestClient(app) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_account(client: TestClient, ref: str, plan: str = "standard") -> str:
    r = client.post(
        "/v1/admin/accounts",
        json={"ref": ref, "name": ref.title(), "plan": plan, "country": "JP"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    return str(r.json()["owner_key"])


def add_member(client: TestClient, owner: str, role: str) -> tuple[int, int, str]:
    r = client.post("/v1/members", json={"name": role, "role": role}, headers=bearer(owner))
    assert r.status_code == 201, r.text
    body = r.json()
    return body["id"], body["key_id"], body["key"]


def assert_problem(r: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_device_lifecycle(client: TestClient) -> None:
    owner = make_account(client, "acme")
    _, _, dev = add_member(client, owner, "developer")
    h = bearer(dev)

    r = client.post("/v1/devices", json={"class": "lte-m", "id": "d1", "name": "pump 1"}, headers=h)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key"].startswith("dmk_")
    assert created["key"].startswith(created["key_prefix"])
    assert created["state"] == "active"
    assert r.headers["location"] == "/v1/devices/d1"
    assert "key" not in client.get("/v1/devices/d1", headers=h).json()

    gw = client.post("/v1/devices", json={"class": "gateway", "id": "gw1"}, headers=h)
    assert gw.status_code == 201
    child = client.post("/v1/devices", json={"class": "wifi", "gateway_id": "gw1"}, headers=h)
    assert child.status_code == 201
    assert child.json()["id"].startswith("dev-")

    assert_problem(
        client.post("/v1/devices", json={"class": "lte-m", "id": "d1"}, headers=h), 409, "id"
    )
    assert_problem(client.post("/v1/devices", json={"class": "zigbee"}, headers=h), 422, "class")
    assert_problem(client.post("/v1/devices", json={}, headers=h), 422, "class")
    assert_problem(
        client.post("/v1/devices", json={"class": "wifi", "bogus": 1}, headers=h), 422, "bogus"
    )
    assert_problem(
        client.post("/v1/devices", json={"class": "lte-m", "id": "a/b"}, headers=h), 422, "id"
    )
    assert_problem(
        client.post("/v1/devices", json={"class": "lte-m", "id": "abc\n"}, headers=h), 422, "id"
    )
    assert_problem(
        client.post("/v1/devices", json={"class": "wifi", "gateway_id": "d1"}, headers=h),
        422,
        "gateway_id",
    )
    assert_problem(
        client.post("/v1/devices", json={"class": "wifi", "gateway_id": "nope"}, headers=h),
        404,
        "gateway_id",
    )
    assert_problem(
        client.post("/v1/devices", content=b"{", headers=h | {"content-type": "application/json"}),
        422,
    )

    off = client.post("/v1/devices/d1/deactivate", headers=h)
    assert off.status_code == 200
    assert off.json()["state"] == "inactive"
    again = client.post("/v1/devices/d1/deactivate", headers=h)
    # Idempotent: the same answer, and a repeated deactivate records one event, not two.
    assert again.status_code == 200
    assert again.json() == off.json()
    assert off.json()["state_since"] == off.json()["state_at"]
    assert client.post("/v1/devices/d1/activate", headers=h).json()["state"] == "active"
    events = client.get("/v1/devices/d1/events", headers=h).json()
    assert [(e["state"], e["source"]) for e in events] == [
        ("active", "api"),
        ("inactive", "api"),
        ("active", "api"),
    ]
    assert_problem(client.get("/v1/devices/nope", headers=h), 404, "device_id")
    assert_problem(client.post("/v1/devices/nope/activate", headers=h), 404)
    assert client.delete("/v1/devices/d1", headers=h).status_code == 405


def test_listing_filters_and_cursor_pagination(client: TestClient) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)
    for i in range(7):
        client.post(
            "/v1/devices", json={"class": "lte-m", "id": f"m{i}", "name": f"meter {i}"}, headers=h
        )
    client.post("/v1/devices", json={"class": "gateway", "id": "gw"}, headers=h)
    client.post("/v1/devices", json={"class": "wifi", "id": "w1", "gateway_id": "gw"}, headers=h)
    client.post("/v1/devices/m3/deactivate", headers=h)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/devices", params=params, headers=h).json()
        seen += [d["id"] for d in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) == ["gw", "m0", "m1", "m2", "m3", "m4", "m5", "m6", "w1"]
    assert pages == 3

    def ids(**params: Any) -> list[str]:
        r = client.get("/v1/devices", params=params, headers=h)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["items"]]

    assert ids(state="inactive") == ["m3"]
    assert ids(**{"class": "wifi"}) == ["w1"]
    assert ids(gateway_id="gw") == ["w1"]
    assert ids(gateway="gw") == ["w1"], "the older name still works"
    assert ids(gateway_id="m1") == []
    assert_problem(
        client.get("/v1/devices", params={"gateway_id": "gw", "gateway": "m1"}, headers=h),
        422,
        "gateway_id",
    )
    listed = client.get("/v1/devices", params={"gateway_id": "gw"}, headers=h).json()
    assert listed["items"][0]["gateway_id"] == "gw"
    assert ids(q="meter 5") == ["m5"]
    assert ids(q="%") == []
    assert_problem(client.get("/v1/devices", params={"state": "on"}, headers=h), 422, "state")
    assert_problem(client.get("/v1/devices", params={"limit": 0}, headers=h), 422, "limit")
    assert_problem(client.get("/v1/devices", params={"cursor": "!!"}, headers=h), 422, "cursor")


def test_heartbeats_per_hour(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)
    assert client.post("/v1/devices", json={"class": "lte-m", "id": "d1"}, headers=h).is_success
    assert client.get("/v1/devices/d1/heartbeats", headers=h).json() == []

    now = datetime.now(UTC)
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    with connect(database_url) as conn:
        row = conn.execute("SELECT account_id FROM devices WHERE id = 'd1'").fetchone()
        assert row is not None
        account_id = int(str(row["account_id"]))
        beats = [
            # Two hours ago (twice, one saying Inactive), this hour, and 30 hours ago.
            (this_hour - timedelta(hours=2) + timedelta(minutes=5), "active", 1),
            (this_hour - timedelta(hours=2) + timedelta(minutes=50), "inactive", 2),
            (min(now, this_hour + timedelta(seconds=1)), "active", 3),
            (this_hour - timedelta(hours=30), "active", 4),
        ]
        write_batch(
            conn,
            [Heartbeat(t, "d1", account_id, "lte-m", st, seq, "d1", t) for t, st, seq in beats],
            [],
        )
    hours = client.get("/v1/devices/d1/heartbeats", headers=h).json()
    assert [(x["hour"], x["heartbeats"], x["active"]) for x in hours] == [
        (iso(this_hour - timedelta(hours=2)), 2, 1),
        (iso(this_hour), 1, 1),
    ]
    assert hours[0]["last_at"] == iso(beats[1][0])
    longer = client.get("/v1/devices/d1/heartbeats", params={"hours": 48}, headers=h).json()
    assert [x["hour"] for x in longer] == [
        iso(this_hour - timedelta(hours=30)),
        iso(this_hour - timedelta(hours=2)),
        iso(this_hour),
    ]
    assert_problem(
        client.get("/v1/devices/d1/heartbeats", params={"hours": 0}, headers=h), 422, "hours"
    )
    assert_problem(
        client.get("/v1/devices/d1/heartbeats", params={"hours": 745}, headers=h), 422, "hours"
    )
    assert_problem(client.get("/v1/devices/nope/heartbeats", headers=h), 404, "device_id")


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_authentication_failures_are_401(client: TestClient) -> None:
    owner = make_account(client, "acme")
    member_id, key_id, dev = add_member(client, owner, "developer")
    body = assert_problem(client.get("/v1/devices"), 401, "authorization")
    assert "Bearer" in body["detail"]
    r = client.get("/v1/devices", headers=bearer("dma_not-a-real-key"))
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(client.get("/v1/devices", headers={"Authorization": "Basic abc"}), 401)
    assert_problem(client.get("/v1/devices", headers={"Authorization": "Bearer  "}), 401)

    assert client.get("/v1/devices", headers=bearer(dev)).status_code == 200
    revoked = client.delete(f"/v1/members/{member_id}/keys/{key_id}", headers=bearer(owner))
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"]
    assert_problem(client.get("/v1/devices", headers=bearer(dev)), 401)
    # Idempotent revoke; unknown key 404; the owner's last key is refused (409).
    assert (
        client.delete(f"/v1/members/{member_id}/keys/{key_id}", headers=bearer(owner)).status_code
        == 200
    )
    assert_problem(
        client.delete(f"/v1/members/{member_id}/keys/999999", headers=bearer(owner)), 404
    )
    members = client.get("/v1/members", headers=bearer(owner)).json()
    owner_row = next(m for m in members if m["role"] == "owner")
    owner_key_id = owner_row["keys"][0]["id"]
    assert_problem(
        client.delete(f"/v1/members/{owner_row['id']}/keys/{owner_key_id}", headers=bearer(owner)),
        409,
    )


def test_the_owner_rotates_their_own_last_key(client: TestClient) -> None:
    owner = make_account(client, "acme")
    member_id, _, developer = add_member(client, owner, "developer")
    members = client.get("/v1/members", headers=bearer(owner)).json()
    me = next(m for m in members if m["role"] == "owner")
    (old,) = me["keys"]
    assert_problem(
        client.delete(f"/v1/members/{me['id']}/keys/{old['id']}", headers=bearer(owner)), 409
    )

    r = client.post("/v1/members/me/keys", headers=bearer(owner))
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    new = r.json()
    assert new["member_id"] == me["id"]
    assert new["key"].startswith("dma_")
    assert new["key"].startswith(new["prefix"])
    assert r.headers["location"] == f"/v1/members/{me['id']}/keys/{new['id']}"
    # Shown once: the list has its prefix only.
    listed = client.get("/v1/members", headers=bearer(new["key"])).json()
    assert new["key"] not in str(listed)
    # The old key, once the last, can now be revoked, with the new one.
    gone = client.delete(f"/v1/members/{me['id']}/keys/{old['id']}", headers=bearer(new["key"]))
    assert gone.status_code == 200
    assert_problem(client.get("/v1/devices", headers=bearer(owner)), 401)
    assert client.get("/v1/devices", headers=bearer(new["key"])).status_code == 200
    assert_problem(
        client.delete(f"/v1/members/{me['id']}/keys/{new['id']}", headers=bearer(new["key"])),
        409,
    )

    # The owner can issue a developer a key too; nobody else can issue keys at all.
    other = client.post(f"/v1/members/{member_id}/keys", headers=bearer(new["key"]))
    assert other.status_code == 201
    assert client.get("/v1/devices", headers=bearer(other.json()["key"])).status_code == 200
    assert_problem(client.post("/v1/members/me/keys", headers=bearer(developer)), 403, "role")
    assert_problem(
        client.post(f"/v1/members/{member_id}/keys", headers=bearer(developer)), 403, "role"
    )
    assert_problem(client.post("/v1/members/999999/keys", headers=bearer(new["key"])), 404)
    stranger = make_account(client, "other")
    assert_problem(client.post(f"/v1/members/{member_id}/keys", headers=bearer(stranger)), 404)


def test_roles(client: TestClient) -> None:
    owner = make_account(client, "acme")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")
    assert_problem(
        client.post("/v1/devices", json={"class": "lte-m"}, headers=bearer(manager)), 403, "role"
    )
    assert client.get("/v1/devices", headers=bearer(manager)).status_code == 200
    assert client.get("/v1/statements", headers=bearer(manager)).status_code == 200
    assert_problem(client.get("/v1/statements", headers=bearer(developer)), 403)
    assert_problem(client.get("/v1/statements/2026-10", headers=bearer(developer)), 403)
    assert_problem(
        client.post("/v1/members", json={"name": "x", "role": "manager"}, headers=bearer(manager)),
        403,
    )
    assert_problem(client.get("/v1/members", headers=bearer(developer)), 403)
    assert_problem(
        client.post("/v1/members", json={"name": "x", "role": "owner"}, headers=bearer(owner)),
        422,
        "role",
    )
    # A1: developers manage devices; usage and statements are for managers and the owner.
    for path in ("/v1/usage", "/v1/usage/daily"):
        assert_problem(client.get(path, headers=bearer(developer)), 403, "role")
        for key in (manager, owner):
            assert client.get(path, headers=bearer(key)).status_code == 200, path


def _owner_key(database_url: str, ref: str) -> str:
    with connect(database_url) as conn, conn.transaction():
        row = conn.execute(
            "SELECT a.id AS account_id, m.id AS member_id FROM accounts a"
            " JOIN members m ON m.account_id = a.id AND m.role = 'owner' WHERE a.ref = %s",
            (ref,),
        ).fetchone()
        assert row is not None
        return issue_key(conn, int(row["account_id"]), int(row["member_id"]))[1]


def test_usage_statements_and_export_of_the_worked_example(
    client: TestClient, database_url: str
) -> None:
    worked_example(database_url)
    h = bearer(_owner_key(database_url, "acme"))

    usage = client.get("/v1/usage", params={"month": "2026-10"}, headers=h).json()
    assert usage["status"] == "preliminary"
    assert usage["classes"]["lte-m"] == {
        "peak": 12,
        "peak_at": "2026-10-05T00:00:00Z",
        "amount": "3500",
        "metric": "peak",
    }
    daily = client.get("/v1/usage/daily", params={"month": "2026-10"}, headers=h).json()
    assert len(daily["days"]) == 31
    assert daily["days"][0]["classes"]["lte-m"] == {"peak": 8, "end_of_day": 8}
    assert daily["days"][4]["classes"]["lte-m"] == {"peak": 12, "end_of_day": 12}
    assert daily["days"][9]["classes"]["lte-m"] == {"peak": 12, "end_of_day": 8}
    assert daily["days"][30]["classes"]["lte-m"] == {"peak": 12, "end_of_day": 12}
    assert max(d["classes"]["lte-m"]["peak"] for d in daily["days"]) == 12
    assert_problem(client.get("/v1/usage", params={"month": "2026-13"}, headers=h), 422, "month")
    assert_problem(client.get("/v1/usage", params={"month": "2027-01"}, headers=h), 422, "month")

    preliminary = client.get("/v1/statements/2026-10", headers=h).json()
    assert (preliminary["status"], preliminary["subtotal"]) == ("preliminary", "3500")
    assert client.get("/v1/statements", headers=h).json() == []
    assert_problem(client.get("/v1/admin/exports/2026-10", headers=ADMIN), 404, "month")

    closed = client.post("/v1/admin/close", json={"month": "2026-10"}, headers=ADMIN)
    assert closed.status_code == 200, closed.text
    assert closed.json()["closed"] == ["acme"]
    assert client.post("/v1/admin/close", json={"month": "2026-10"}, headers=ADMIN).json()[
        "already_closed"
    ] == ["acme"]

    final = client.get("/v1/statements/2026-10", headers=h).json()
    assert final["status"] == "final"
    assert [(x["quantity"], x["unit_price"], x["amount"]) for x in final["lines"]] == [
        (10, "300", "3000"),
        (2, "250", "500"),
    ]
    assert (final["subtotal"], final["tax"], final["amount_due"], final["due_date"]) == (
        "3500",
        "350",
        "3850",
        "2026-11-30",
    )
    listed = client.get("/v1/statements", headers=h).json()
    assert [s["month"] for s in listed] == ["2026-10"]
    assert (
        client.get("/v1/usage", params={"month": "2026-10"}, headers=h).json()["status"] == "final"
    )

    export = client.get("/v1/admin/exports/2026-10", params={"format": "jsonl"}, headers=ADMIN)
    assert export.status_code == 200
    import hashlib

    assert (
        export.headers["x-devmeter-checksum"]
        == "sha256=" + hashlib.sha256(export.content).hexdigest()
    )
    assert export.headers["x-devmeter-export-id"].startswith("dmx-2026-10-")
    assert (
        client.get("/v1/admin/exports/2026-10", params={"format": "jsonl"}, headers=ADMIN).content
        == export.content
    )
    events = client.get(
        "/v1/admin/exports/2026-10", params={"format": "cloudevents"}, headers=ADMIN
    )
    assert events.status_code == 200
    assert events.headers["x-devmeter-export-id"] == export.headers["x-devmeter-export-id"]
    assert "devmeter-2026-10.cloudevents.jsonl" in events.headers["content-disposition"]
    [first_event, *_] = [json.loads(line) for line in events.content.splitlines()]
    assert (first_event["specversion"], first_event["type"], first_event["subject"]) == (
        "1.0",
        "devmeter.statement.line",
        "acme",
    )
    assert first_event["data"]["amount_due"] == "3850"


def test_usage_of_a_distinct_plan_names_its_metric(client: TestClient, database_url: str) -> None:
    # M6: on the seats plan every device Active in October counts: d1-d17, the last at 23:59:59.
    worked_example(database_url, "seat", "seats")
    h = bearer(_owner_key(database_url, "seat"))
    expected = {
        "peak": 17,
        "peak_at": "2026-10-31T14:59:59Z",
        "amount": "4750",
        "metric": "distinct",
    }

    preliminary = client.get("/v1/usage", params={"month": "2026-10"}, headers=h).json()
    assert (preliminary["status"], preliminary["classes"]["lte-m"]) == ("preliminary", expected)
    daily = client.get("/v1/usage/daily", params={"month": "2026-10"}, headers=h).json()
    assert daily["peak"]["lte-m"] == expected

    closed = client.post("/v1/admin/close", json={"month": "2026-10"}, headers=ADMIN)
    assert closed.json()["closed"] == ["seat"]
    final = client.get("/v1/usage", params={"month": "2026-10"}, headers=h).json()
    assert (final["status"], final["classes"]["lte-m"]) == ("final", expected)
    statement = client.get("/v1/statements/2026-10", headers=h).json()
    assert (statement["subtotal"], statement["usage"]["lte-m"]["peak"]) == ("4750", 17)


def test_operator_endpoints_need_the_operator_token(client: TestClient) -> None:
    owner = make_account(client, "acme")
    assert_problem(client.get("/v1/admin/accounts"), 401)
    assert_problem(client.get("/v1/admin/accounts", headers=bearer("wrong")), 401)
    assert_problem(client.get("/v1/admin/accounts", headers=bearer(owner)), 401)
    listed = client.get("/v1/admin/accounts", headers=ADMIN).json()
    assert [a["ref"] for a in listed] == ["acme"]
    assert_problem(
        client.post(
            "/v1/admin/accounts",
            json={"ref": "acme", "name": "A", "plan": "standard", "country": "JP"},
            headers=ADMIN,
        ),
        409,
        "ref",
    )
    assert_problem(
        client.post(
            "/v1/admin/accounts",
            json={"ref": "b", "name": "B", "plan": "gold", "country": "JP"},
            headers=ADMIN,
        ),
        422,
        "plan",
    )
    assert_problem(
        client.post("/v1/admin/close", json={"month": "2026-1"}, headers=ADMIN), 422, "month"
    )


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    client.get("/v1/devices")
    text = client.get("/metrics").text
    assert 'devmeter_api_requests_total{method="GET",route="/v1/devices",status="401"}' in text


def test_readyz_reports_an_unreachable_broker(database_url: str) -> None:
    from devmeter.embedded import free_port

    config = Settings(env="test")
    app = create_app(
        config, database_url=database_url, mqtt_url=f"mqtt://127.0.0.1:{free_port()}", console=False
    )
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["broker"].startswith("unreachable")


def test_database_down_is_503_with_retry_after() -> None:
    from devmeter.embedded import free_port

    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    app = create_app(Settings(env="test"), database_url=nowhere, mqtt_url=None, console=False)
    with TestClient(app) as c:
        r = c.get("/v1/devices", headers=bearer("dma_whatever"))
        assert_problem(r, 503)
        assert r.headers["retry-after"] == "5"
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503


def _object_ids(client: TestClient, owner: str) -> dict[str, str]:
    h = bearer(owner)
    client.post("/v1/devices", json={"class": "lte-m", "id": "b-dev"}, headers=h)
    member_id, key_id, _ = add_member(client, owner, "developer")
    return {"device_id": "b-dev", "member_id": str(member_id), "key_id": str(key_id)}


def test_tenant_isolation_walks_every_endpoint(client: TestClient) -> None:
    """A key of account A gets 404 for every object of account B, on every endpoint with one."""
    a = make_account(client, "alpha")
    b = make_account(client, "beta")
    b_ids = _object_ids(client, b)
    spec = client.get("/openapi.json").json()
    checked = []
    for path, operations in spec["paths"].items():
        params = re.findall(r"{(\w+)}", path)
        object_params = [p for p in params if p in b_ids]
        if not object_params or path.startswith("/v1/admin"):
            continue
        for method in operations:
            url = path
            for p in params:
                url = url.replace("{" + p + "}", b_ids[p])
            r = client.request(
                method.upper(), url, headers=bearer(a), json={} if method == "post" else None
            )
            assert r.status_code == 404, (method, url, r.status_code, r.text)
            assert "b-dev" not in r.text or "unknown device" in r.text
            checked.append((method, path))
            # B still sees its own object.
            mine = client.request(method.upper(), url, headers=bearer(b))
            assert mine.status_code in (200, 201, 409), (method, url, mine.text)
    assert len(checked) >= 5, checked
    # Listings never show another account's objects.
    assert client.get("/v1/devices", headers=bearer(a)).json()["items"] == []
    assert [m["role"] for m in client.get("/v1/members", headers=bearer(a)).json()] == ["owner"]


def test_idempotency_key_on_device_registration(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)

    def count() -> int:
        with connect(database_url) as conn:
            row = conn.execute("SELECT count(*) AS n FROM devices").fetchone()
        assert row is not None
        return int(row["n"])

    # No id in the body: without the key a retry would register a second device.
    key = {"Idempotency-Key": "4f1c6d3e-reg-1"}
    first = client.post("/v1/devices", json={"class": "lte-m", "name": "p"}, headers=h | key)
    assert first.status_code == 201, first.text
    assert first.json()["key"].startswith("dmk_")
    assert "idempotent-replayed" not in first.headers
    again = client.post("/v1/devices", json={"name": "p", "class": "lte-m"}, headers=h | key)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["cache-control"] == "no-store"
    mqtt_without_key = first.json()["mqtt"] | {"password": None}
    assert again.json() == first.json() | {"key": None, "mqtt": mqtt_without_key}, (
        "the same device, its key not kept"
    )
    assert count() == 1
    with connect(database_url) as conn:
        stored = conn.execute("SELECT response::text AS r FROM idempotency_keys").fetchone()
    assert stored is not None
    assert first.json()["key"] not in stored["r"]

    # The same key with another request: 409, nothing registered.
    other = client.post("/v1/devices", json={"class": "wifi"}, headers=h | key)
    assert_problem(other, 409, "idempotency-key")
    assert count() == 1
    # Keys are per account: another account's same key is a new request.
    stranger = make_account(client, "other")
    theirs = client.post("/v1/devices", json={"class": "lte-m"}, headers=bearer(stranger) | key)
    assert theirs.status_code == 201
    assert "idempotent-replayed" not in theirs.headers
    # A refused request keeps no key: fixed and retried with the same key, it runs.
    bad = {"Idempotency-Key": "retry-after-fix"}
    refused = client.post("/v1/devices", json={"class": "nope"}, headers=h | bad)
    assert_problem(refused, 422, "class")
    fixed = client.post("/v1/devices", json={"class": "nope"}, headers=h | bad)
    assert_problem(fixed, 422, "class")
    assert client.post("/v1/devices", json={"class": "wifi"}, headers=h | bad).status_code == 201
    # After 24 hours a key is forgotten.
    with connect(database_url) as conn:
        conn.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    later = client.post("/v1/devices", json={"class": "lte-m", "name": "p"}, headers=h | key)
    assert later.status_code == 201
    assert "idempotent-replayed" not in later.headers
    assert later.json()["id"] != first.json()["id"]
    assert_problem(
        client.post("/v1/devices", json={"class": "lte-m"}, headers=h | {"Idempotency-Key": ""}),
        422,
        "idempotency-key",
    )


def test_concurrent_requests_with_one_idempotency_key_register_one_device(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    headers = bearer(owner) | {"Idempotency-Key": "same-key"}
    start = threading.Barrier(6)

    def post(_: int) -> tuple[int, str, bool]:
        start.wait()
        r = client.post("/v1/devices", json={"class": "lte-m"}, headers=headers)
        return r.status_code, r.json()["id"], r.headers.get("idempotent-replayed") == "true"

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, range(6)))
    assert {status for status, _, _ in results} == {201}
    assert len({device_id for _, device_id, _ in results}) == 1, results
    assert sorted(replayed for _, _, replayed in results) == [False] + [True] * 5
    with connect(database_url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM devices").fetchone()
    assert row == {"n": 1}


def test_a_body_that_is_not_json_is_415(client: TestClient) -> None:
    owner = make_account(client, "acme")
    h = bearer(owner)
    form = client.post("/v1/devices", data={"class": "lte-m"}, headers=h)
    body = assert_problem(form, 415, "content-type")
    assert "application/x-www-form-urlencoded" in body["detail"]
    for content_type in ("text/plain", "application/xml", "multipart/form-data; boundary=x"):
        r = client.post(
            "/v1/devices", content=b'{"class": "lte-m"}', headers=h | {"content-type": content_type}
        )
        assert_problem(r, 415, "content-type")
    members = client.post("/v1/members", content=b"name=x", headers=h)  # no Content-Type
    assert_problem(members, 415, "content-type")
    admin = client.post(
        "/v1/admin/close", content=b"month=2026-10", headers=ADMIN | {"content-type": "text/plain"}
    )
    assert_problem(admin, 415, "content-type")
    assert client.get("/v1/devices", headers=h).json()["items"] == [], "nothing was registered"

    # JSON, with a charset or as a +json type, is read; JSON that does not parse stays 422.
    ok = client.post(
        "/v1/devices",
        content=b'{"class": "lte-m", "id": "d1"}',
        headers=h | {"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 201, ok.text
    ok = client.post(
        "/v1/devices",
        content=b'{"class": "lte-m", "id": "d2"}',
        headers=h | {"content-type": "application/merge-patch+json"},
    )
    assert ok.status_code == 201, ok.text
    assert_problem(
        client.post("/v1/devices", content=b"{", headers=h | {"content-type": "application/json"}),
        422,
        "body",
    )
    assert_problem(client.post("/v1/devices", headers=h), 422, "body")
    # Endpoints without a body do not care.
    r = client.post("/v1/devices/d1/deactivate", headers=h | {"content-type": "text/plain"})
    assert r.status_code == 200
    assert "415" in client.get("/openapi.json").json()["paths"]["/v1/devices"]["post"]["responses"]


def test_docs_work_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "<script>" not in page.text, "no inline script: the policy would block it"
    assert urls, page.text
    for url in urls:
        assert re.match(r"^/[^/]", url), f"{url} is not local"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    assert any(url.endswith("swagger-ui-bundle.js") for url in urls)
    # What the page reads: this server's own document.
    assert "/openapi.json" in client.get("/docs/init.js").text
    assert client.get("/redoc").status_code == 404, "ReDoc would load from a CDN"


def test_openapi_declares_every_problem_code(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            codes = set(op["responses"])
            if path.startswith("/v1/") and not path.startswith("/v1/admin"):
                assert {"401", "403"} <= codes, (method, path)
            if "{" in path and path.startswith("/v1/") and "statements" not in path:
                assert "404" in codes, (method, path)
    assert datetime.now(UTC)


def test_openapi_declares_how_each_operation_authenticates(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"]["type"] == schemes["OperatorToken"]["type"] == "http"
    assert schemes["ApiKey"]["scheme"] == schemes["OperatorToken"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.startswith("/v1/admin/"):
                assert op["security"] == [{"OperatorToken": []}], (method, path)
            elif path.startswith("/v1/"):
                assert op["security"] == [{"ApiKey": []}], (method, path)
            else:
                assert "security" not in op, (method, path)


def test_two_accounts_each_have_their_own_pump_1(client: TestClient) -> None:
    """D1a: ids are unique per account; a registration never collides with another account's
    device, and nothing in either account's answers reveals the other's."""
    a, b = make_account(client, "alpha"), make_account(client, "beta")
    ra = client.post("/v1/devices", json={"class": "lte-m", "id": "pump-1"}, headers=bearer(a))
    rb = client.post("/v1/devices", json={"class": "wifi", "id": "pump-1"}, headers=bearer(b))
    assert (ra.status_code, rb.status_code) == (201, 201), (ra.text, rb.text)
    # Each gets its own key and MQTT identity: the account is part of it.
    assert ra.json()["key"] != rb.json()["key"]
    assert ra.json()["mqtt"]["username"] == "alpha/pump-1"
    assert rb.json()["mqtt"]["topic"] == "devmeter/v2/beta/pump-1/heartbeat"
    assert ra.json()["mqtt"]["password"] == ra.json()["key"]
    # A second pump-1 in the same account is a conflict naming only that account.
    again = client.post("/v1/devices", json={"class": "lte-m", "id": "pump-1"}, headers=bearer(a))
    body = assert_problem(again, 409, "id")
    assert "beta" not in again.text
    assert "alpha" in body["detail"]
    # Each account acts on its own pump-1 only.
    assert client.post("/v1/devices/pump-1/deactivate", headers=bearer(a)).status_code == 200
    assert client.get("/v1/devices/pump-1", headers=bearer(a)).json()["state"] == "inactive"
    mine = client.get("/v1/devices/pump-1", headers=bearer(b)).json()
    assert (mine["state"], mine["class"]) == ("active", "wifi")
    # Rotating one account's key leaves the other's alone.
    rotated = client.post("/v1/devices/pump-1/rotate-key", headers=bearer(b))
    assert rotated.status_code == 200, rotated.text
    assert rotated.headers["cache-control"] == "no-store"
    assert rotated.json()["key"] not in (rb.json()["key"], ra.json()["key"])
    assert (
        client.get("/v1/devices/pump-1", headers=bearer(a)).json()["key_prefix"]
        == (ra.json()["key_prefix"])
    )
    events_a = client.get("/v1/devices/pump-1/events", headers=bearer(a)).json()
    assert [e["state"] for e in events_a] == ["active", "inactive"]
