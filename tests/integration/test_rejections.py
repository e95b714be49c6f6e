"""Refused heartbeats are visible (issue 9, part 6): GET /v1/rejections, the module behind it,
`devmeter rejections list` and the /metrics counter, against a real PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from devmeter.config import SERVICE_ROLE, Settings
from devmeter.db import connect, service_url
from ingest.processor import QUARANTINE_PAYLOAD_BYTES, Reason, Rejection
from ingest.rejections import Q, RejectionFilter, list_rejections, payload_view
from ingest.writer import write_batch
from tests.conftest import SERVICE_PASSWORD, Cli, InProcessCli
from tests.integration.test_api import add_member, assert_problem, bearer, make_account
from tests.integration.test_cli_registry import _create_acme


@pytest.fixture
def cli(cli: Cli) -> Cli:
    """The `devmeter` entry point run in this process: these tests make many calls
    (tests/conftest.py, InProcessCli)."""
    return InProcessCli(cli.env, cli.cwd)


@pytest.fixture
def client(database_url: str, mqtt_url: str) -> Iterator[TestClient]:
    config = Settings(admin_token="op-token-for-tests", env="test")  # type: ignore[arg-type]
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url, console=False)
    with TestClient(app) as c:
        yield c


T0 = datetime(2026, 10, 5, 0, 0, tzinfo=UTC)


def account_id(url: str, ref: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT id FROM accounts WHERE ref = %s", (ref,)).fetchone()
    assert row is not None
    return int(row["id"])  # type: ignore[call-overload]


def reject(
    url: str,
    *rejections: tuple[str | None, str | None, Reason, bytes, datetime],
) -> None:
    """Store rejections as the worker does (write_batch, as the service role): each is
    (account ref or None, device id or None, reason, payload, received at)."""
    rows = []
    for ref, device, reason, payload, at in rejections:
        topic = f"devmeter/v2/{ref}/{device}/heartbeat" if ref else "devmeter/v9/nowhere"
        rows.append(
            Rejection(
                reason,
                f"{reason.value} detail",
                topic,
                payload,
                at,
                account_id(url, ref) if ref else None,
                device if ref else None,
            )
        )
    with connect(url) as conn:
        write_batch(conn, [], rows)


def two_accounts_with_pump_1(client: TestClient) -> tuple[str, str]:
    a = make_account(client, "alpha")
    b = make_account(client, "beta")
    for key in (a, b):
        r = client.post("/v1/devices", json={"class": "lte-m", "id": "pump-1"}, headers=bearer(key))
        assert r.status_code == 201, r.text
    return a, b


def test_an_account_never_sees_another_accounts_rejections(
    client: TestClient, database_url: str
) -> None:
    a, b = two_accounts_with_pump_1(client)
    reject(
        database_url,
        ("alpha", "pump-1", Reason.SCHEMA, b'{"state": "on"}', T0),
        ("beta", "pump-1", Reason.MALFORMED_JSON, b"beta's secret", T0 + timedelta(seconds=1)),
        (None, None, Reason.BAD_TOPIC, b"nobody's", T0 + timedelta(seconds=2)),
    )
    for key, mine, reason, payload in (
        (a, "alpha", "schema", '{"state": "on"}'),
        (b, "beta", "malformed_json", "beta's secret"),
    ):
        for query in ("", "?device_id=pump-1", f"?reason={reason}"):
            r = client.get(f"/v1/rejections{query}", headers=bearer(key))
            assert r.status_code == 200, r.text
            body = r.json()
            assert [(i["topic"], i["reason"], i["payload"]) for i in body["items"]] == [
                (f"devmeter/v2/{mine}/pump-1/heartbeat", reason, payload)
            ], (key, query)
            assert body["summary"] == {reason: 1}
            assert "secret" not in r.text or mine == "beta"
            assert "nobody" not in r.text
    # The other account's reason filters to nothing, not to the other's rows.
    r = client.get("/v1/rejections?reason=malformed_json", headers=bearer(a))
    assert r.json()["items"] == []


def test_filters_paging_and_summary(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "alpha")
    for device in ("d1", "d2"):
        client.post("/v1/devices", json={"class": "lte-m", "id": device}, headers=bearer(owner))
    # Seven rejections; three share one instant, so the cursor must order ties by id.
    reject(
        database_url,
        *[
            ("alpha", "d1" if n % 2 else "d2", Reason.SCHEMA if n < 5 else Reason.TS_IN_FUTURE,
             f'{{"n": {n}}}'.encode(), T0 + timedelta(minutes=min(n, 4)))
            for n in range(7)
        ],
    )  # fmt: skip
    _, _, developer = add_member(client, owner, "developer")
    _, _, manager = add_member(client, owner, "manager")
    for key in (owner, developer, manager):
        assert client.get("/v1/rejections", headers=bearer(key)).status_code == 200

    seen: list[int] = []
    url = "/v1/rejections?limit=3"
    pages = 0
    while url:
        body = client.get(url, headers=bearer(developer)).json()
        seen += [json.loads(i["payload"])["n"] for i in body["items"]]
        assert body["summary"] == {"schema": 5, "ts_in_future": 2}
        assert body["summary_complete"] is True
        pages += 1
        url = f"/v1/rejections?limit=3&cursor={body['next_cursor']}" if body["next_cursor"] else ""
    assert pages == 3
    # Newest first; at the shared instant (n = 4, 5, 6) the later id first.
    assert seen == [6, 5, 4, 3, 2, 1, 0]

    def ns(query: str) -> list[int]:
        r = client.get(f"/v1/rejections?{query}", headers=bearer(developer))
        assert r.status_code == 200, r.text
        return [json.loads(i["payload"])["n"] for i in r.json()["items"]]

    assert ns("reason=ts_in_future") == [6, 5]
    assert ns("device_id=d1") == [5, 3, 1]
    since, until = (T0 + timedelta(minutes=1)).isoformat(), (T0 + timedelta(minutes=3)).isoformat()
    assert ns(f"since={since.replace('+', '%2B')}&until={until.replace('+', '%2B')}") == [2, 1]
    assert ns("device_id=d1&reason=schema") == [3, 1]
    assert ns("device_id=nope") == []
    r = client.get("/v1/rejections?device_id=d1&reason=schema", headers=bearer(developer))
    # The summary ignores the reason filter (the other reasons stay visible), not the device.
    assert r.json()["summary"] == {"schema": 2, "ts_in_future": 1}

    h = bearer(developer)
    assert_problem(client.get("/v1/rejections?reason=bogus", headers=h), 422, "reason")
    assert_problem(client.get("/v1/rejections?limit=0", headers=h), 422, "limit")
    assert_problem(client.get("/v1/rejections?limit=501", headers=h), 422, "limit")
    assert_problem(client.get("/v1/rejections?since=2026-10-01T00:00:00", headers=h), 422, "since")
    assert_problem(client.get("/v1/rejections?until=yesterday", headers=h), 422, "until")
    backwards = "since=2026-10-02T00:00:00Z&until=2026-10-01T00:00:00Z"
    assert_problem(client.get(f"/v1/rejections?{backwards}", headers=h), 422, "until")
    assert_problem(client.get("/v1/rejections?cursor=bm9wZQ", headers=h), 422, "cursor")
    assert_problem(client.get("/v1/rejections?device_id=a%00b", headers=h), 422, "device_id")
    assert_problem(client.get("/v1/rejections"), 401, "authorization")


def test_payloads_are_text_or_base64_and_say_when_cut() -> None:
    assert payload_view(b'{"a": "\xc3\xa9"}') == ('{"a": "é"}', "utf-8", False)
    assert payload_view(b"\xff\x00") == (base64.b64encode(b"\xff\x00").decode(), "base64", False)
    # Cut at 4 KiB in the middle of a two-byte character: the text up to it, flagged.
    cut = (b"a" * (QUARANTINE_PAYLOAD_BYTES - 1) + "é".encode())[:QUARANTINE_PAYLOAD_BYTES]
    text, encoding, truncated = payload_view(cut)
    assert (text, encoding, truncated) == ("a" * (QUARANTINE_PAYLOAD_BYTES - 1), "utf-8", True)
    assert payload_view(b"\xff" * QUARANTINE_PAYLOAD_BYTES)[1:] == ("base64", True)


def test_the_api_shows_a_truncated_binary_payload(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "alpha")
    client.post("/v1/devices", json={"class": "lte-m", "id": "d1"}, headers=bearer(owner))
    big = bytes(range(256)) * 300  # over 64 KiB, not UTF-8
    reject(database_url, ("alpha", "d1", Reason.PAYLOAD_TOO_LARGE, big[:4096], T0))
    (item,) = client.get("/v1/rejections", headers=bearer(owner)).json()["items"]
    assert item["payload_encoding"] == "base64"
    assert base64.b64decode(item["payload"]) == big[:4096]
    assert item["payload_bytes"] == 4096
    assert item["payload_truncated"] is True
    assert item["device_id"] == "d1"


def test_an_accounts_page_is_read_through_its_index(owner_database_url: str) -> None:
    """The plan PostgreSQL picks, on a quarantine big enough for the choice to matter."""
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rejected_heartbeats (received_at, topic, reason, detail, payload, "
            "account_id, device_id) "
            "SELECT timestamptz '2026-10-01' + n * interval '1 second', 't', "
            "(ARRAY['schema', 'ts_in_future', 'bad_topic'])[n % 3 + 1], 'd', '\\x00', "
            "CASE WHEN n % 10 = 0 THEN NULL ELSE n % 200 END, 'pump-1' "
            "FROM generate_series(1, 40000) AS n"
        )
        conn.execute("ANALYZE rejected_heartbeats")
        params = {
            "account_id": 7,
            "reason": None,
            "device_id": "pump-1",
            "since": datetime(2026, 10, 1, 3, tzinfo=UTC),
            "until": None,
            "after_at": datetime(2026, 10, 1, 9, tzinfo=UTC),
            "after_id": 99999,
            "limit": 51,
            "cap": 10_000,
        }
        for query in ("select_account_rejections", "count_account_rejections_by_reason"):
            plan = "\n".join(
                str(row[0]) for row in conn.execute("EXPLAIN " + Q[query], params).fetchall()
            )
            assert "rejected_heartbeats_account" in plan, plan
            assert "Seq Scan" not in plan, plan


def test_the_module_lists_the_operators_unattributed_rows(
    client: TestClient, database_url: str
) -> None:
    make_account(client, "alpha")
    client.post(
        "/v1/devices",
        json={"class": "lte-m", "id": "d1"},
        headers=bearer(make_account(client, "b")),
    )
    reject(
        database_url,
        (None, None, Reason.BAD_TOPIC, b"x", T0),
        (None, None, Reason.UNKNOWN_DEVICE, b"y", T0 + timedelta(seconds=1)),
        ("b", "d1", Reason.SCHEMA, b"z", T0 + timedelta(seconds=2)),
    )
    with connect(database_url) as conn:
        page = list_rejections(conn, "unattributed")
        assert [r.payload for r in page.items] == ["y", "x"]
        assert page.summary == {"bad_topic": 1, "unknown_device": 1}
        only = list_rejections(conn, "unattributed", RejectionFilter(reason="bad_topic"))
        assert [r.payload for r in only.items] == ["x"]
        assert list_rejections(conn, account_id(database_url, "alpha")).items == []


def test_metrics_count_rejections_from_the_database(client: TestClient, database_url: str) -> None:
    make_account(client, "alpha")
    client.post(
        "/v1/devices",
        json={"class": "lte-m", "id": "d1"},
        headers=bearer(make_account(client, "beta")),
    )
    reject(
        database_url,
        ("beta", "d1", Reason.TS_IN_FUTURE, b"{}", T0),
        ("beta", "d1", Reason.TS_IN_FUTURE, b"{}", T0),
        (None, None, Reason.BAD_TOPIC, b"{}", T0),
    )
    text = client.get("/metrics").text
    assert "# TYPE devmeter_rejected_heartbeats_total counter" in text
    assert 'devmeter_rejected_heartbeats_total{reason="ts_in_future"} 2.0' in text
    assert 'devmeter_rejected_heartbeats_total{reason="bad_topic"} 1.0' in text
    # Every reason is there from the start, so a rate works from the first refusal.
    assert 'devmeter_rejected_heartbeats_total{reason="not_bound"} 0.0' in text
    # The API's own metrics are still there.
    assert "devmeter_api_requests_total" in text


def test_the_cli_lists_an_accounts_rejections(cli: Cli, owner_database_url: str) -> None:
    _create_acme(cli)
    registered = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
    assert registered.code == 0, registered.stderr
    url = service_url(owner_database_url, SERVICE_ROLE, SERVICE_PASSWORD)
    reject(
        url,
        ("acme", "d1", Reason.SCHEMA, b'{"a": 1}', T0),
        ("acme", "d1", Reason.TS_IN_FUTURE, b"\xff", T0 + timedelta(seconds=1)),
        (None, None, Reason.BAD_TOPIC, b"x", T0),
    )
    r = cli("rejections", "list", "--account", "acme")
    assert r.code == 0, r.stderr
    body = r.json()
    assert isinstance(body, dict)
    assert body["account"] == "acme"
    assert [(i["reason"], i["payload"], i["payload_encoding"]) for i in body["items"]] == [
        ("ts_in_future", "/w==", "base64"),
        ("schema", '{"a": 1}', "utf-8"),
    ]
    assert body["items"][0]["received_at"] == "2026-10-05T00:00:01Z"
    assert body["summary"] == {"schema": 1, "ts_in_future": 1}

    r = cli("rejections", "list", "--account", "acme", "--reason", "schema", "--device", "d1",
            "--since", "2026-10-05", "--limit", "1")  # fmt: skip
    assert r.code == 0, r.stderr
    assert [i["reason"] for i in r.json()["items"]] == ["schema"]  # type: ignore[index]

    r = cli("rejections", "list", "--unattributed")
    assert r.code == 0, r.stderr
    assert [i["topic"] for i in r.json()["items"]] == ["devmeter/v9/nowhere"]  # type: ignore[index]

    # No scope: the operator sees every rejection, the account's and the unattributed.
    r = cli("rejections", "list")
    assert r.code == 0, r.stderr
    every = r.json()["items"]  # type: ignore[index]
    assert "devmeter/v9/nowhere" in [i["topic"] for i in every]
    assert {i["device_id"] is None for i in every} == {True, False}

    for args, field in (
        (("--account", "nope"), "unknown account 'nope'"),
        (("--account", "acme", "--reason", "bogus"), "unknown reason 'bogus'"),
        (("--account", "acme", "--since", "soon"), "--since"),
        (("--account", "acme", "--limit", "0"), "limit"),
        (("--account", "acme", "--unattributed"), "--account"),
        (
            (
                "--device",
                "d1",
            ),
            "account",
        ),
        (("--unattributed", "--device", "d1"), "device"),
    ):
        r = cli("rejections", "list", *args)
        assert r.code == 2, (args, r.stdout, r.stderr)
        assert r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert field in r.stderr, r.stderr


@pytest.mark.parametrize("role", ["owner", "manager", "developer"])
def test_every_role_may_read_rejections(client: TestClient, role: str) -> None:
    owner = make_account(client, "alpha")
    key = owner if role == "owner" else add_member(client, owner, role)[2]
    assert client.get("/v1/rejections", headers=bearer(key)).json()["items"] == []
