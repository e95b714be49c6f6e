from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ingest.processor import (
    MAX_CHILDREN,
    MAX_PAYLOAD_BYTES,
    QUARANTINE_PAYLOAD_BYTES,
    DeviceInfo,
    Heartbeat,
    Reason,
    Rejection,
    device_topic,
    gateway_topic,
    process,
)

RECEIVED = datetime(2026, 10, 10, 3, 0, tzinfo=UTC)
REGISTERED = datetime(2026, 9, 30, 1, 0, tzinfo=UTC)
DIRECTORY = {
    ("acme", "d1"): DeviceInfo(7, "lte-m", None, REGISTERED),
    ("acme", "g1"): DeviceInfo(7, "gateway", None, REGISTERED),
    ("acme", "c1"): DeviceInfo(7, "wifi", "g1", REGISTERED),
    ("acme", "c2"): DeviceInfo(7, "wifi", "g1", REGISTERED),
    ("acme", "c9"): DeviceInfo(7, "wifi", "g9", REGISTERED),
    ("acme", "late"): DeviceInfo(7, "lte-m", None, RECEIVED),
}


def _payload(**fields: object) -> bytes:
    body: dict[str, object] = {"state": "active", "ts": "2026-10-10T02:59:00Z", "seq": 5}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_device_heartbeat() -> None:
    assert process(device_topic("acme", "d1"), _payload(), RECEIVED, DIRECTORY) == [
        Heartbeat(
            datetime(2026, 10, 10, 2, 59, tzinfo=UTC), "d1", 7, "lte-m", "active", 5, "d1", RECEIVED
        )
    ]


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-10-10T11:59:00+09:00", datetime(2026, 10, 10, 2, 59, tzinfo=UTC)),
        ("2026-10-10T02:59:00.123456Z", datetime(2026, 10, 10, 2, 59, 0, 123456, tzinfo=UTC)),
        (1_791_601_140_001, datetime(2026, 10, 10, 2, 59, 0, 1000, tzinfo=UTC)),
    ],
)
def test_ts_forms(ts: object, expected: datetime) -> None:
    result = process(device_topic("acme", "d1"), _payload(ts=ts), RECEIVED, DIRECTORY)
    assert isinstance(result, list)
    assert result[0].time == expected
    assert result[0].time.tzinfo is UTC


def test_gateway_heartbeat_reports_itself_and_bound_children() -> None:
    payload = _payload(
        state="inactive",
        devices=[{"id": "c1", "state": "active"}, {"id": "c2", "state": "inactive"}],
    )
    result = process(gateway_topic("acme", "g1"), payload, RECEIVED, DIRECTORY)
    assert isinstance(result, list)
    assert [(h.device_id, h.device_class, h.state, h.reporter, h.seq) for h in result] == [
        ("g1", "gateway", "inactive", "g1", 5),
        ("c1", "wifi", "active", "g1", 5),
        ("c2", "wifi", "inactive", "g1", 5),
    ]


def test_gateway_without_children_reports_itself() -> None:
    result = process(gateway_topic("acme", "g1"), _payload(), RECEIVED, DIRECTORY)
    assert isinstance(result, list)
    assert [h.device_id for h in result] == ["g1"]


def test_ts_exactly_five_minutes_ahead_is_accepted() -> None:
    ts = (RECEIVED + timedelta(minutes=5)).isoformat()
    assert isinstance(
        process(device_topic("acme", "d1"), _payload(ts=ts), RECEIVED, DIRECTORY), list
    )


CHILDREN_OVER = [{"id": f"x{i}", "state": "active"} for i in range(MAX_CHILDREN + 1)]


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "detail"),
    [
        ("devmeter/v2/acme/d1/status", _payload(), Reason.BAD_TOPIC, "expected"),
        ("devmeter/v1/acme/d1/heartbeat", _payload(), Reason.BAD_TOPIC, "expected"),
        ("devmeter/v2/acme//heartbeat", _payload(), Reason.BAD_TOPIC, "expected"),
        ("devmeter/v2/acme/d1/heartbeat/x", _payload(), Reason.BAD_TOPIC, "expected"),
        (
            device_topic("acme", "d1"),
            b" " * (MAX_PAYLOAD_BYTES + 1),
            Reason.PAYLOAD_TOO_LARGE,
            "65537",
        ),
        (device_topic("acme", "d1"), b"{not json", Reason.MALFORMED_JSON, "malformed"),
        (device_topic("acme", "d1"), b"", Reason.MALFORMED_JSON, "truncated"),
        (device_topic("acme", "d1"), b"[]", Reason.SCHEMA, "Expected `object`"),
        (
            device_topic("acme", "d1"),
            _payload(seq=...),
            Reason.SCHEMA,
            "missing required field `seq`",
        ),
        (device_topic("acme", "d1"), _payload(extra=1), Reason.SCHEMA, "unknown field `extra`"),
        (device_topic("acme", "d1"), _payload(seq="5"), Reason.SCHEMA, "`$.seq`"),
        (device_topic("acme", "d1"), _payload(seq=True), Reason.SCHEMA, "`$.seq`"),
        (device_topic("acme", "d1"), _payload(seq=-1), Reason.SCHEMA, "`$.seq`"),
        (device_topic("acme", "d1"), _payload(state="on"), Reason.SCHEMA, "`$.state`"),
        (device_topic("acme", "d1"), _payload(ts=1.5), Reason.SCHEMA, "`$.ts`"),
        (device_topic("acme", "d1"), _payload(ts="yesterday"), Reason.SCHEMA, "`$.ts`"),
        (
            device_topic("acme", "d1"),
            _payload(ts="2026-10-10T02:59:00"),
            Reason.SCHEMA,
            "UTC offset",
        ),
        (device_topic("acme", "d1"), _payload(ts=10**20), Reason.SCHEMA, "`$.ts`"),
        (device_topic("acme", "d1"), _payload(ts=0), Reason.SCHEMA, "before 2000"),
        (
            device_topic("acme", "d1"),
            _payload(devices=[]),
            Reason.SCHEMA,
            "unknown field `devices`",
        ),
        # Invalid UTF-8 inside a JSON string: msgspec raises UnicodeDecodeError for it.
        (
            device_topic("acme", "d1"),
            b'{"state":"\xff","ts":1,"seq":2}',
            Reason.MALFORMED_JSON,
            "utf",
        ),
        # Valid, but past year 9999 once in UTC.
        (
            device_topic("acme", "d1"),
            _payload(ts="9999-12-31T23:59:59-01:00"),
            Reason.SCHEMA,
            "range",
        ),
        # A NUL in a field name, which msgspec copies into its message: stored escaped.
        (
            device_topic("acme", "d1"),
            _payload(**{"\x00": 0}),
            Reason.SCHEMA,
            "unknown field `\\x00`",
        ),
        (device_topic("acme", "nope"), _payload(), Reason.UNKNOWN_DEVICE, "'nope'"),
        (
            device_topic("acme", "d1"),
            _payload(ts="2026-10-10T03:05:00.000001Z"),
            Reason.TS_IN_FUTURE,
            "more than 0:05:00",
        ),
        (device_topic("acme", "late"), _payload(), Reason.BEFORE_REGISTRATION, "'late'"),
        (gateway_topic("acme", "d1"), _payload(), Reason.NOT_A_GATEWAY, "not a gateway"),
        (
            gateway_topic("acme", "g1"),
            _payload(devices=CHILDREN_OVER),
            Reason.TOO_MANY_CHILDREN,
            "1001",
        ),
        (
            gateway_topic("acme", "g1"),
            _payload(devices=[{"id": "c9", "state": "active"}]),
            Reason.NOT_BOUND,
            "'c9' is not bound to gateway 'g1'",
        ),
        (
            gateway_topic("acme", "g1"),
            _payload(devices=[{"id": "ghost", "state": "active"}]),
            Reason.UNKNOWN_DEVICE,
            "'ghost'",
        ),
        (
            gateway_topic("acme", "g1"),
            _payload(devices=[{"id": "c1", "state": "active"}, {"id": "c1", "state": "active"}]),
            Reason.SCHEMA,
            "listed twice",
        ),
        (
            gateway_topic("acme", "g1"),
            _payload(devices=[{"id": "c1"}]),
            Reason.SCHEMA,
            "missing required field `state`",
        ),
    ],
)
def test_rejections(topic: str, payload: bytes, reason: Reason, detail: str) -> None:
    result = process(topic, payload, RECEIVED, DIRECTORY)
    assert isinstance(result, Rejection)
    assert (result.reason, result.topic, result.received_at) == (reason, topic, RECEIVED)
    assert detail in result.detail
    assert result.payload == payload[:QUARANTINE_PAYLOAD_BYTES]


def test_quarantined_payload_is_truncated() -> None:
    result = process(device_topic("acme", "d1"), b"x" * MAX_PAYLOAD_BYTES, RECEIVED, DIRECTORY)
    assert isinstance(result, Rejection)
    assert len(result.payload) == QUARANTINE_PAYLOAD_BYTES


def test_details_hold_no_nul_and_an_unforeseen_error_is_quarantined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nul = process(device_topic("acme", "d1"), _payload(**{"a\x00b": 0}), RECEIVED, DIRECTORY)
    assert isinstance(nul, Rejection)
    assert "\x00" not in nul.detail

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("ingest.processor._process", broken)
    result = process(device_topic("acme", "d1"), _payload(), RECEIVED, DIRECTORY)
    assert isinstance(result, Rejection)
    assert result.reason == Reason.SCHEMA
    assert result.detail == "unprocessable: RuntimeError: a bug"


def test_a_topic_names_its_account_so_ids_may_repeat_across_accounts() -> None:
    # d1 exists in acme only: the same id under another account is another device.
    rejected = process(device_topic("beta", "d1"), _payload(), RECEIVED, DIRECTORY)
    assert isinstance(rejected, Rejection)
    assert rejected.reason == Reason.UNKNOWN_DEVICE
    assert (rejected.account_id, rejected.device_id) == (None, None)
    both = {**DIRECTORY, ("beta", "d1"): DeviceInfo(8, "wifi", None, REGISTERED)}
    beats = process(device_topic("beta", "d1"), _payload(), RECEIVED, both)
    assert isinstance(beats, list)
    assert [(b.account_id, b.device_class) for b in beats] == [(8, "wifi")]


def test_a_rejection_about_a_known_device_names_its_account() -> None:
    rejected = process(device_topic("acme", "d1"), b"{nope", RECEIVED, DIRECTORY)
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.account_id, rejected.device_id) == (
        Reason.MALFORMED_JSON,
        7,
        "d1",
    )
    # A gateway naming an unbound child: the rejection is about the gateway.
    payload = _payload(devices=[{"id": "c9", "state": "active"}])
    rejected = process(gateway_topic("acme", "g1"), payload, RECEIVED, DIRECTORY)
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.device_id) == (Reason.NOT_BOUND, "g1")
