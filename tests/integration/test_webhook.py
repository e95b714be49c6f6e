"""The statement webhook end to end: a closed month, a real PostgreSQL, a real HTTP receiver.

Time is driven through ``deliver_due(now=...)``; nothing here sleeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devmeter.db import connect
from devmeter.errors import InvalidError
from metering import webhook
from metering.catalog import load_catalog
from metering.export import export_month
from metering.statements import close_month
from metering.webhook import DeliveryReport, backoff, deliver_due, enqueue, sign, verify
from tests.conftest import Cli, seed_fleet
from tests.integration.conftest import Receiver

SECRET = b"whsec-test-3f9c1d7e-never-log-me"
KEY = "dmstmt-acme-2026-10"


@pytest.fixture
def statement_id(database_url: str, receiver: Receiver) -> int:
    seed_fleet(
        database_url,
        [("d1", "lte-m", None), ("d2", "lte-m", None), ("g1", "gateway", None)],
        datetime(2026, 9, 15, 1, 0, tzinfo=UTC),  # 2026-09-15 10:00 in Tokyo
    )
    report = close_month(
        lambda: connect(database_url),
        load_catalog(),
        "2026-10",
        now=datetime(2026, 11, 22, tzinfo=UTC),
        on_closed=lambda c, sid: enqueue(c, sid, receiver.url),
    )
    assert report.closed == ["acme"], report
    [row] = rows(database_url, "SELECT id FROM statements")
    return int(row["id"])


class Clock:
    """The schedulers' clock. Starts after the enqueue (due at the database's now())."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta


@pytest.fixture
def clock(statement_id: int) -> Clock:  # noqa: ARG001  # created after the enqueue
    return Clock()


def deliver(url: str, clock: Clock, **kwargs: Any) -> DeliveryReport:
    kwargs.setdefault("timeout_s", 5)
    return deliver_due(lambda: connect(url), secret=SECRET, now=clock, **kwargs)


def rows(url: str, query: str) -> list[dict[str, Any]]:
    with connect(url) as conn:
        return conn.execute(query).fetchall()


def attempts(url: str) -> list[tuple[int, int | None]]:
    return [
        (r["attempt"], r["status_code"])
        for r in rows(url, "SELECT * FROM webhook_attempts ORDER BY delivery_id, attempt")
    ]


def add_deliveries(url: str, statement_id: int, targets: list[str]) -> None:
    with connect(url) as conn, conn.transaction():
        for target in targets:
            enqueue(conn, statement_id, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_delivers_the_closed_statement_once_signed(
    database_url: str, statement_id: int, receiver: Receiver, clock: Clock
) -> None:
    assert deliver(database_url, clock) == DeliveryReport(delivered=1)

    [request] = receiver.requests
    with connect(database_url) as conn:
        export = export_month(conn, "2026-10", "jsonl", statement_id=statement_id)
    assert request.path == "/billing/devmeter"
    assert request.body == export.body
    assert b'"account":"acme"' in request.body
    headers = request.headers
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Idempotency-Key"] == KEY
    assert headers["X-Devmeter-Export-Id"] == export.export_id
    assert headers["X-Devmeter-Checksum"] == f"sha256={hashlib.sha256(request.body).hexdigest()}"
    assert headers["User-Agent"].startswith("devmeter/")
    signature = headers["X-Devmeter-Signature"]
    assert signature.startswith(f"t={int(clock().timestamp())},v1=")
    assert verify(SECRET, signature, request.body, now=int(clock().timestamp()))

    [delivery] = rows(database_url, "SELECT * FROM webhook_deliveries")
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
    assert delivery["delivered_at"] == clock()
    assert attempts(database_url) == [(1, 200)]

    clock.advance(timedelta(days=1))
    assert deliver(database_url, clock) == DeliveryReport()
    assert len(receiver.requests) == 1


def test_the_signature_verifies_with_stripes_sdk(
    database_url: str, receiver: Receiver, clock: Clock
) -> None:
    """A receiver already built for Stripe's webhooks can check ours with Stripe's library:
    same ``t=<unix>,v1=<hex>`` header, same HMAC-SHA256 of ``f"{t}.{body}"``."""
    import stripe

    assert deliver(database_url, clock) == DeliveryReport(delivered=1)
    [request] = receiver.requests
    header = request.headers["X-Devmeter-Signature"]
    secret = SECRET.decode()
    # Stripe checks the timestamp against the real clock, which Clock starts from.
    assert stripe.WebhookSignature.verify_header(request.body.decode(), header, secret, 300)
    assert stripe.WebhookSignature.verify_header(request.body, header, secret, 300)
    tampered = request.body.replace(b'"amount_due":"', b'"amount_due":"1')
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(tampered, header, secret, 300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(request.body, header, "whsec-another-secret", 300)


def test_enqueue_is_idempotent_and_the_key_names_the_statement(
    database_url: str, statement_id: int, receiver: Receiver
) -> None:
    add_deliveries(database_url, statement_id, [receiver.url, "https://billing.example/hook"])

    deliveries = rows(database_url, "SELECT url, idempotency_key FROM webhook_deliveries")
    assert sorted(d["url"] for d in deliveries) == sorted(
        [receiver.url, "https://billing.example/hook"]
    )
    assert {d["idempotency_key"] for d in deliveries} == {KEY}
    with (
        pytest.raises(InvalidError, match="http"),
        connect(database_url) as conn,
        conn.transaction(),
    ):
        enqueue(conn, statement_id, "file:///etc/passwd")


def test_a_500_is_retried_after_the_backoff(
    database_url: str, receiver: Receiver, clock: Clock
) -> None:
    receiver.answer_next("500")
    first = clock()
    assert deliver(database_url, clock) == DeliveryReport(retried=1)

    [delivery] = rows(database_url, "SELECT * FROM webhook_deliveries")
    assert delivery["status"] == "pending"
    assert first + timedelta(seconds=27) <= delivery["next_attempt_at"]
    assert delivery["next_attempt_at"] <= first + timedelta(seconds=33)

    clock.advance(timedelta(seconds=26))
    assert deliver(database_url, clock) == DeliveryReport()
    assert len(receiver.requests) == 1

    clock.advance(timedelta(seconds=8))
    assert deliver(database_url, clock) == DeliveryReport(delivered=1)
    assert attempts(database_url) == [(1, 500), (2, 200)]
    logged = rows(database_url, "SELECT attempted_at, error FROM webhook_attempts ORDER BY attempt")
    assert logged[1]["attempted_at"] - logged[0]["attempted_at"] >= timedelta(seconds=27)
    assert logged[0]["error"] is not None
    assert logged[1]["error"] is None
    # The resend is the same statement under the same key, signed afresh.
    one, two = receiver.requests
    assert one.body == two.body
    assert one.headers["Idempotency-Key"] == two.headers["Idempotency-Key"] == KEY
    assert one.headers["X-Devmeter-Signature"] != two.headers["X-Devmeter-Signature"]
    assert verify(
        SECRET, two.headers["X-Devmeter-Signature"], two.body, now=int(clock().timestamp())
    )


def test_a_refused_connection_is_a_failed_attempt(
    database_url: str, statement_id: int, clock: Clock
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    add_deliveries(database_url, statement_id, [dead])

    assert deliver(database_url, clock) == DeliveryReport(delivered=1, retried=1)
    [logged] = rows(
        database_url,
        "SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
        f" WHERE d.url = '{dead}'",
    )
    assert logged["status_code"] is None
    assert "refused" in logged["error"].lower()
    assert logged["duration_ms"] >= 0


def test_a_dropped_connection_is_a_failed_attempt(
    database_url: str, receiver: Receiver, clock: Clock
) -> None:
    receiver.answer_next("drop")
    assert deliver(database_url, clock) == DeliveryReport(retried=1)
    [logged] = rows(database_url, "SELECT * FROM webhook_attempts")
    assert logged["status_code"] is None
    assert "RemoteDisconnected" in logged["error"]


def test_a_timeout_is_a_failed_attempt(database_url: str, receiver: Receiver, clock: Clock) -> None:
    receiver.answer_next("hang")
    assert deliver(database_url, clock, timeout_s=0.2) == DeliveryReport(retried=1)
    [logged] = rows(database_url, "SELECT * FROM webhook_attempts")
    assert logged["status_code"] is None
    assert "timed out" in logged["error"]
    assert logged["duration_ms"] >= 200


def test_a_redirect_is_not_followed(database_url: str, receiver: Receiver, clock: Clock) -> None:
    receiver.answer_next("302")
    assert deliver(database_url, clock) == DeliveryReport(retried=1)
    assert [r.path for r in receiver.requests] == ["/billing/devmeter"]
    assert attempts(database_url) == [(1, 302)]


def test_gives_up_after_max_attempts(
    database_url: str,
    receiver: Receiver,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.answer_next("500", "503", "500", "500")
    reports = []
    for _ in range(3):
        reports.append(deliver(database_url, clock, max_attempts=3))
        clock.advance(timedelta(hours=7))  # past any back-off, the 6 h cap plus jitter too
    assert reports == [
        DeliveryReport(retried=1),
        DeliveryReport(retried=1),
        DeliveryReport(failed=1),
    ]

    [delivery] = rows(database_url, "SELECT * FROM webhook_deliveries")
    assert (delivery["status"], delivery["attempts"]) == ("failed", 3)
    assert attempts(database_url) == [(1, 500), (2, 503), (3, 500)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    [error] = [r for r in errors if r.name == "devmeter.webhook"]
    assert KEY in error.getMessage()

    clock.advance(timedelta(days=30))
    assert deliver(database_url, clock, max_attempts=3) == DeliveryReport()
    assert len(receiver.requests) == 3


def test_an_operator_retry_sends_a_failed_delivery_again(
    database_url: str, receiver: Receiver, clock: Clock, cli: Cli
) -> None:
    receiver.answer_next("500", "502", "503")
    for _ in range(2):
        deliver(database_url, clock, max_attempts=2)
        clock.advance(timedelta(hours=7))
    listed = cli("webhooks", "list", "--status", "failed")
    assert listed.code == 0, listed.stderr
    [failed] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (failed["account"], failed["month"], failed["status"]) == ("acme", "2026-10", "failed")
    assert (failed["attempts"], failed["last_status_code"]) == (2, 502)
    assert failed["idempotency_key"] == KEY
    assert failed["next_attempt_at"] is None

    refused = cli("webhooks", "retry")
    assert refused.code != 0
    assert "name what to retry" in refused.stderr
    assert cli("webhooks", "retry", "--month", "2026-09").json() == {"retried": []}
    bad = cli("webhooks", "retry", "--account", "acme", "--url", "ftp://billing.example/x")
    assert bad.code != 0
    assert "http:// or https://" in bad.stderr
    # Billing moved: the retry goes to the new URL.
    moved = receiver.url.replace("/billing/devmeter", "/billing/v2")
    retried = cli("webhooks", "retry", "--account", "acme", "--url", moved)
    assert retried.code == 0, retried.stderr
    assert retried.json() == {"retried": [failed["id"]]}
    # Already pending: a second retry finds nothing failed.
    assert cli("webhooks", "retry", "--delivery", str(failed["id"])).json() == {"retried": []}

    # Due now, with a fresh allowance: attempt 3 fails (1 of 2 this round), 4 delivers.
    clock.at = datetime.now(UTC) + timedelta(seconds=1)
    assert deliver(database_url, clock, max_attempts=2) == DeliveryReport(retried=1)
    clock.advance(timedelta(hours=7))
    assert deliver(database_url, clock, max_attempts=2) == DeliveryReport(delivered=1)
    assert attempts(database_url) == [(1, 500), (2, 502), (3, 503), (4, 200)]
    assert [r.path for r in receiver.requests] == [
        "/billing/devmeter",
        "/billing/devmeter",
        "/billing/v2",
        "/billing/v2",
    ]
    assert {r.headers["Idempotency-Key"] for r in receiver.requests} == {KEY}
    with connect(database_url) as conn:
        [delivered] = webhook.list_deliveries(conn, status="delivered")
        with pytest.raises(InvalidError, match="unknown delivery status"):
            webhook.list_deliveries(conn, status="lost")
    assert (delivered.attempts, delivered.last_status_code) == (4, 200)
    assert delivered.url == moved


def test_a_locked_delivery_is_skipped_not_waited_for(
    database_url: str, statement_id: int, receiver: Receiver, clock: Clock
) -> None:
    add_deliveries(database_url, statement_id, [receiver.url + "/second"])
    with connect(database_url) as holder:
        # Another scheduler in the middle of claiming the first delivery.
        holder.execute(
            "SELECT id FROM webhook_deliveries WHERE url = %s FOR UPDATE", (receiver.url,)
        )
        results: list[DeliveryReport] = []
        thread = threading.Thread(target=lambda: results.append(deliver(database_url, clock)))
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "deliver_due waited for a locked delivery"
        holder.rollback()
    assert results == [DeliveryReport(delivered=1)]
    assert [r.path for r in receiver.requests] == ["/billing/devmeter/second"]

    assert deliver(database_url, clock) == DeliveryReport(delivered=1)
    assert sorted(r.path for r in receiver.requests) == [
        "/billing/devmeter",
        "/billing/devmeter/second",
    ]


def test_racing_schedulers_send_each_delivery_once(
    database_url: str, statement_id: int, receiver: Receiver, clock: Clock
) -> None:
    add_deliveries(database_url, statement_id, [f"{receiver.url}/{n}" for n in range(30)])
    start = threading.Barrier(2)
    results: list[DeliveryReport] = []

    def scheduler() -> None:
        start.wait(timeout=30)
        results.append(deliver(database_url, clock))

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2
    assert sum(r.delivered for r in results) == 31
    assert sum(r.retried + r.failed for r in results) == 0
    paths = [r.path for r in receiver.requests]
    assert len(paths) == len(set(paths)) == 31
    assert attempts(database_url) == [(1, 200)] * 31


class Crash(BaseException):
    """The process dying in the middle of the HTTP call."""


def test_a_crash_mid_call_resends_after_the_lease(
    database_url: str,
    receiver: Receiver,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*_args: object) -> int:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(webhook, "_post", crash)
        with pytest.raises(Crash):
            deliver(database_url, clock)
    [delivery] = rows(database_url, "SELECT * FROM webhook_deliveries")
    assert (delivery["status"], delivery["attempts"]) == ("pending", 1)
    assert attempts(database_url) == []

    # Leased for the timeout (5 s) plus the margin: nobody sends it meanwhile.
    clock.advance(timedelta(seconds=60))
    assert deliver(database_url, clock) == DeliveryReport()
    clock.advance(timedelta(seconds=6))
    assert deliver(database_url, clock) == DeliveryReport(delivered=1)
    assert attempts(database_url) == [(2, 200)]
    assert [r.headers["Idempotency-Key"] for r in receiver.requests] == [KEY]


def test_no_transaction_is_open_during_the_http_call(
    database_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = webhook._post
    seen: list[list[str]] = []

    def watched(*args: Any) -> int:
        seen.append(
            [
                r["state"]
                for r in rows(
                    database_url,
                    "SELECT state FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
            ]
        )
        return post(*args)

    monkeypatch.setattr(webhook, "_post", watched)
    assert deliver(database_url, clock) == DeliveryReport(delivered=1)
    # The scheduler's connection is there, idle: no locks, no snapshot held across the call.
    assert seen == [["idle"]]


def test_the_secret_is_never_logged_sent_or_stored(
    database_url: str,
    statement_id: int,
    receiver: Receiver,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dead = f"http://127.0.0.1:{free_port()}/dead"
    add_deliveries(database_url, statement_id, [dead, receiver.url + "/other"])
    receiver.answer_next("500", "drop")
    for _ in range(2):
        deliver(database_url, clock, max_attempts=2)
        clock.advance(timedelta(hours=7))
    # Every path was taken: an HTTP error, a dropped and a refused connection, a success
    # after a retry, and giving up.
    statuses = rows(database_url, "SELECT url, status FROM webhook_deliveries")
    assert {d["url"]: d["status"] for d in statuses} == {
        receiver.url: "delivered",
        dead: "failed",
        receiver.url + "/other": "delivered",
    }

    secret = SECRET.decode()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        assert secret not in text
        assert '"export_id"' not in text  # nor the statement itself
    stored = rows(database_url, "SELECT * FROM webhook_attempts") + rows(
        database_url, "SELECT * FROM webhook_deliveries"
    )
    assert secret not in repr(stored)
    for request in receiver.requests:
        assert secret not in repr(request.headers)


def test_verify_rejects_what_it_should() -> None:
    body = b'{"account":"acme"}\n'
    at = 1_795_000_000
    header = sign(SECRET, body, at)

    assert verify(SECRET, header, body, now=at)
    assert verify(SECRET, header, body, now=at + 300)
    assert not verify(SECRET, header, body + b" ", now=at)  # tampered body
    assert not verify(b"another secret", header, body, now=at)
    assert not verify(SECRET, header, body, now=at + 301)  # stale: a replay
    assert not verify(SECRET, header, body, now=at - 301)  # from the future
    # The timestamp is signed: moving it forward to pass the tolerance breaks the signature.
    assert not verify(SECRET, header.replace(f"t={at}", f"t={at + 1000}"), body, now=at + 1000)
    for malformed in ("", "t=,v1=", f"t={at}", header.split(",")[1], "garbage", f"t=x{at},v1=0"):
        assert not verify(SECRET, malformed, body, now=at)
    # During a secret rotation the sender may sign with both.
    rotated = f"{header},v1={sign(b'old', body, at).split('v1=')[1]}"
    assert verify(SECRET, rotated, body, now=at)
    assert verify(b"old", rotated, body, now=at)


@pytest.mark.parametrize(
    ("attempt", "rand", "seconds"),
    [
        (1, 0.5, 30),
        (2, 0.5, 60),
        (3, 0.5, 120),
        (10, 0.5, 15_360),
        (11, 0.5, 21_600),  # the 6 h cap
        (100, 0.5, 21_600),
        (1, 0.0, 27),  # -10 %
        (1, 1.0, 33),  # +10 %
        (12, 0.0, 19_440),  # jitter applies at the cap too
        (12, 1.0, 23_760),
    ],
)
def test_backoff(attempt: int, rand: float, seconds: int) -> None:
    assert backoff(attempt, rand=lambda: rand) == timedelta(seconds=seconds)
